"""Hook overhead of cnn_cost's timers on the seed's setup (resnet18, 64 x 3 x 28 x 28, CPU).

Plain and hooked forwards are run in alternating order, `--rounds` times; we report the median and min-max of the paired
ratios hooked/plain, and the cost per hook call. Also times the reference: bare pre+post hooks that only store
`time.perf_counter_ns()` on the leaves (the figure the issue quotes).
Run: python bench/hook_overhead.py [--rounds 60]"""
import argparse, time, json, numpy as np, torch
from pathlib import Path
from fastai.vision.all import *
from cnn_cost.all import *
from cnn_cost.timing import CPUClock, timed
from cnn_cost.counting import count_pass
from cnn_cost.core import cost_units
from cnn_cost.learner import _hooked, costed

def bare_hooks(mods):
    st = []
    def pre(m, a): st.append(time.perf_counter_ns())
    def post(m, a, o): st.append(time.perf_counter_ns())
    return [h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]

def main(rounds=60, size=28, bs=64, arch='resnet18'):
    dls = digits_dls(size=size, bs=bs)
    learn = vision_learner(dls, getattr(models, arch), pretrained=False, n_out=10)
    model = learn.model.eval(); xb = dls.one_batch()[0]
    fwd = lambda: model(xb)
    units = cost_units(model)
    units,recs = costed(units, count_pass(model, (xb,), units))
    mods, clock = units.itemgot(1), CPUClock()
    leaves = [m for n,m,k in units if k=='leaf']
    res = {'plain':[], 'cnn_cost':[], 'bare':[]}
    with torch.no_grad():
        for _ in range(3): fwd()
        for i in range(rounds):
            order = ['plain','cnn_cost','bare'] if i%2 else ['bare','cnn_cost','plain']
            for o in order:
                if o=='plain': res[o].append(timed(fwd, clock))
                elif o=='cnn_cost': res[o].append(_hooked(fwd, mods, clock)[0])
                else:
                    hs = bare_hooks(leaves)
                    try: res[o].append(timed(fwd, clock))
                    finally:
                        for h in hs: h.remove()
    # hook calls per forward: pre+post per call of each hooked module
    calls = sum(r.calls for r in recs)
    plain = np.array(res['plain'])
    out = {'setup': f'{arch} {bs}x3x{size}x{size} cpu, torch threads={torch.get_num_threads()}', 'rounds': rounds,
           'plain_ms_median': float(np.median(plain)), 'hook_calls_per_forward': 2*calls,
           'leaf_hook_calls_per_forward': 2*sum(r.calls for r in recs if r.kind=='leaf')}
    for k in ['cnn_cost','bare']:
        r = np.array(res[k])/plain
        out[k] = {'ratio_median': float(np.median(r)), 'ratio_min': float(r.min()), 'ratio_max': float(r.max()),
                  'us_per_hook_call': float(np.median(np.array(res[k])-plain)*1e3/(out['hook_calls_per_forward'] if k=='cnn_cost' else out['leaf_hook_calls_per_forward']))}
    print(json.dumps(out, indent=1))
    o = Path(__file__).parent/'out'; o.mkdir(exist_ok=True)
    (o/'hook_overhead.json').write_text(json.dumps(out, indent=1))
    c,b = out['cnn_cost'],out['bare']
    (o/'hook_overhead.md').write_text(
        f"{out['setup']}, {rounds} rounds, plain forward {out['plain_forward_ms'] if 'plain_forward_ms' in out else out['plain_ms_median']:.1f} ms (median)\n\n"
        "| timers | hook calls / forward | hooked / plain: median (min–max) | µs per hook call |\n|---|---:|---:|---:|\n"
        f"| cnn_cost `TimeHooks` (leaves + parents' own work) | {out['hook_calls_per_forward']} | {c['ratio_median']:.3f} ({c['ratio_min']:.3f}–{c['ratio_max']:.3f}) | {c['us_per_hook_call']:.1f} |\n"
        f"| bare pre+post hooks storing `perf_counter_ns` (leaves only, reference) | {out['leaf_hook_calls_per_forward']} | {b['ratio_median']:.3f} ({b['ratio_min']:.3f}–{b['ratio_max']:.3f}) | {b['us_per_hook_call']:.1f} |\n")
    return out

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--rounds', type=int, default=60); p.add_argument('--size', type=int, default=28)
    p.add_argument('--bs', type=int, default=64); p.add_argument('--arch', default='resnet18')
    a = p.parse_args(); main(a.rounds, a.size, a.bs, a.arch)
