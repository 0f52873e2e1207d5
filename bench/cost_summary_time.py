"""Wall time of `learn.cost_summary()` on the seed's setup (resnet18, 64 x 3 x 28 x 28, CPU), import time aside,
and how much of it is the forward passes it runs.

Each round times, back to back: one plain forward, one counting pass (`count_pass`), and one whole `learn.cost_summary()`.
The summary runs `n_passes` forwards: 1 counting pass + `n_warmup` plain + `n_repeat` hooked + `n_repeat` plain.
Its expected time is count_pass + (n_passes-1) plain forwards; the rest is cnn_cost's own work (hook registration,
summary building). Run: python bench/cost_summary_time.py [--rounds 5]"""
import argparse, json, time, numpy as np, torch
from pathlib import Path
from fastai.vision.all import *
from cnn_cost.all import *

def main(rounds=5):
    learn = vision_learner(digits_dls(), resnet18, pretrained=False, n_out=10)
    xb = learn.dls.train.one_batch()[0]
    model = learn.model.eval()
    learn.cost_summary(n_repeat=2)  # first call: lazy imports, allocator warm-up
    res = dict(wall=[], plain=[], count=[], passes=[])
    for _ in range(rounds):
        with torch.no_grad():
            t = time.perf_counter(); model(xb); res['plain'].append(time.perf_counter()-t)
            t = time.perf_counter(); count_pass(model, (xb,)); res['count'].append(time.perf_counter()-t)
        t = time.perf_counter(); cs = learn.cost_summary(); res['wall'].append(time.perf_counter()-t)
        res['passes'].append(cs.n_passes)
    med = {k: float(np.median(v)) for k,v in res.items()}
    expected = med['count'] + (med['passes']-1)*med['plain']
    out = {'setup': 'resnet18 64x3x28x28 cpu', 'rounds': rounds, 'n_passes': int(med['passes']),
           'cost_summary_s_median': med['wall'], 'cost_summary_s_min': float(min(res['wall'])), 'cost_summary_s_max': float(max(res['wall'])),
           'plain_forward_ms': med['plain']*1e3, 'count_pass_ms': med['count']*1e3,
           'forward_passes_share': expected/med['wall']}
    print(json.dumps(out, indent=1))
    o = Path(__file__).parent/'out'; o.mkdir(exist_ok=True)
    (o/'cost_summary_time.json').write_text(json.dumps(out, indent=1))
    (o/'cost_summary_time.md').write_text(
        f"{out['setup']}, {rounds} rounds (import time and the first call aside)\n\n"
        f"- `learn.cost_summary()`: median {out['cost_summary_s_median']:.2f} s (min {out['cost_summary_s_min']:.2f}, max {out['cost_summary_s_max']:.2f})\n"
        f"- forward passes it runs: {out['n_passes']} (1 counting pass, 2 warm-up, 10 hooked, 10 plain)\n"
        f"- plain forward {out['plain_forward_ms']:.1f} ms, counting pass {out['count_pass_ms']:.1f} ms: the passes account for "
        f"{100*out['forward_passes_share']:.0f}% of the call's time, the rest is cnn_cost's own work (hooks, statistics)\n")
    return out

if __name__ == '__main__':
    p = argparse.ArgumentParser(); p.add_argument('--rounds', type=int, default=5)
    main(p.parse_args().rounds)
