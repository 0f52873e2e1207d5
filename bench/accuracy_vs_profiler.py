"""How close cnn_cost's per-layer times are to `torch.profiler`'s, layer by layer.

CPU (always): the seed's setup (fastai resnet18, a real 64 x 3 x 28 x 28 batch of digits). cnn_cost's `time_ms` of every leaf layer
against the profiler's CPU time of the aten ops that ran inside that layer: each leaf call is wrapped in a `record_function` range
named after the layer, and the layer's profiler time is the range's children's CPU time (the aten ops, `aten::mkldnn_convolution`
under `aten::conv2d` etc.; the range's own bookkeeping left out). Both are the median over passes of the per-pass sum over calls;
cnn_cost runs and profiled passes alternate `--rounds` times so that drift hits both alike.
CUDA (when a GPU is there): resnet50, batch 64, 224 x 224: hooked/plain forward ratio of cnn_cost, and each layer's CUDA-event time
against the profiler's kernel time (device time) under the layer's range.
We report the ratio cnn_cost / profiler for layers above `--min-us` (50 µs): median and min–max.
Run: python bench/accuracy_vs_profiler.py [--rounds 3] [--device cpu|cuda|all]; writes bench/out/accuracy_vs_profiler.{json,md}"""
import argparse, json, warnings, logging, platform
from pathlib import Path
from collections import defaultdict
import numpy as np, torch, torchvision
from torch.profiler import profile, ProfilerActivity, record_function
from cnn_cost.all import *
import sys; sys.path.insert(0, str(Path(__file__).parent.parent/'tests'))
from profiler_refs import range_hooks, attribute

warnings.filterwarnings('ignore')
OUT = Path(__file__).parent/'out'

def seed_setup():
    from fastai.vision.all import vision_learner, resnet18
    dls = digits_dls()
    return vision_learner(dls, resnet18, pretrained=False, n_out=10).model.eval(), dls.train.one_batch()[0].cpu()

def profiled_pass(model, x, cuda):
    "ms per leaf layer in one profiled forward: aten CPU time (or CUDA kernel time) under the layer's range, summed over calls"
    acts = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA]*cuda
    hs = range_hooks(model, leaves_only=True)
    try:
        with torch.no_grad(), profile(activities=acts) as p:
            model(x)
            if cuda: torch.cuda.synchronize()
    finally:
        for h in hs: h.remove()
    # the ops in each range, each op's own time (`profiler_refs.attribute`): CPU time, or on CUDA the kernels it launched, each kernel once
    # (not the range's `device_time_total`, which could hold the span the profiler draws for the range on the GPU's timeline)
    res, rng = defaultdict(float, {k: v/1e3 for k,v in attribute(p.events(), 'cuda' if cuda else 'cpu')['fwd'].items()}), defaultdict(float)
    for e in p.events():
        if e.name.startswith('cc::'): rng[e.name[4:]] += e.cpu_time_total/1e3
    return res, rng

def compare(model, x, rounds, n_repeat, min_us):
    cuda = x.device.type=='cuda'
    cc, pr, prr, hooked_over_plain = defaultdict(list), defaultdict(list), defaultdict(list), []
    with torch.no_grad():
        for _ in range(3): model(x)  # warm-up, also of the profiler path
    profiled_pass(model, x, cuda)
    for r in range(rounds):
        s = model_cost(model, x, n_repeat=n_repeat)
        hooked_over_plain += [h/p for h,p in zip(s.hooked_ms, s.plain_ms)]
        for rec in s.records:
            if rec.kind=='leaf' and rec.times: cc[rec.name] += list(rec.times)
        for _ in range(n_repeat//2 or 1):
            ops, rng = profiled_pass(model, x, cuda)
            for k,v in ops.items(): pr[k].append(v); prr[k].append(rng[k])
        print(f'  round {r+1}/{rounds}', flush=True)
    rows = []
    for k in cc:
        if k not in pr: continue
        a, b = float(np.median(cc[k])), float(np.median(pr[k]))
        c = float(np.median(prr[k]))
        rows.append({'layer': k, 'type': type(model.get_submodule(k)).__name__, 'cnn_cost_ms': a, 'profiler_ms': b, 'ratio': a/b if b else None,
                     'profiler_range_ms': c, 'ratio_range': a/c if c else None})
    big = [r for r in rows if r['profiler_ms']*1e3 >= min_us]
    rat, rr = np.array([r['ratio'] for r in big]), np.array([r['ratio_range'] for r in big])
    hp = np.array(hooked_over_plain)
    return {'device': str(x.device), 'input': list(x.shape), 'model': type(model).__name__, 'rounds': rounds, 'n_repeat': n_repeat,
            'min_us': min_us, 'n_layers': len(rows), 'n_layers_above_min': len(big),
            'ratio_median': float(np.median(rat)), 'ratio_min': float(rat.min()), 'ratio_max': float(rat.max()),
            'within_10pct': int((abs(rat-1)<=0.1).sum()),
            'ratio_range_median': float(np.median(rr)), 'ratio_range_min': float(rr.min()), 'ratio_range_max': float(rr.max()),
            'within_10pct_range': int((abs(rr-1)<=0.1).sum()), 'sum_cnn_cost_ms': sum(r['cnn_cost_ms'] for r in big),
            'sum_profiler_ms': sum(r['profiler_ms'] for r in big),
            'hooked_over_plain': {'median': float(np.median(hp)), 'min': float(hp.min()), 'max': float(hp.max())}, 'layers': rows}

def markdown(results):
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}", '']
    for r in results:
        lines += [f"### {r['model']} {'x'.join(map(str, r['input']))} on {r['device']}", '',
                  f"- layers above {r['min_us']:.0f} µs: {r['n_layers_above_min']} of {r['n_layers']}; cnn_cost / profiler per layer: "
                  f"median {r['ratio_median']:.3f} (min {r['ratio_min']:.3f}, max {r['ratio_max']:.3f}); within 10%: {r['within_10pct']}",
                  f"- against the whole range instead (the layer's Python work and the range's own cost included; CPU): median "
                  f"{r['ratio_range_median']:.3f} (min {r['ratio_range_min']:.3f}, max {r['ratio_range_max']:.3f}); within 10%: {r['within_10pct_range']}",
                  f"- summed over those layers: cnn_cost {r['sum_cnn_cost_ms']:.2f} ms, profiler {r['sum_profiler_ms']:.2f} ms",
                  f"- hooked / plain forward (cnn_cost): median {r['hooked_over_plain']['median']:.3f} "
                  f"({r['hooked_over_plain']['min']:.3f}–{r['hooked_over_plain']['max']:.3f})", '',
                  '| layer | type | cnn_cost ms | profiler ms (ops) | ratio | profiler ms (range) | ratio |', '|---|---|---:|---:|---:|---:|---:|']
        lines += [f"| {l['layer']} | {l['type']} | {l['cnn_cost_ms']:.3f} | {l['profiler_ms']:.3f} | {l['ratio']:.3f} | {l['profiler_range_ms']:.3f} | {l['ratio_range']:.3f} |"
                  for l in sorted(r['layers'], key=lambda l: -l['profiler_ms']) if l['profiler_ms']*1e3 >= r['min_us']]
        lines.append('')
    return '\n'.join(lines)

if __name__ == '__main__':
    logging.disable(logging.WARNING)
    ap = argparse.ArgumentParser()
    ap.add_argument('--rounds', type=int, default=3); ap.add_argument('--n-repeat', type=int, default=10)
    ap.add_argument('--min-us', type=float, default=50.); ap.add_argument('--device', default='all', choices=['cpu', 'cuda', 'all'])
    ap.add_argument('--threads', type=int, default=1, help='torch threads on CPU: 1 keeps timings stable when the cores are shared')
    ap.add_argument('--cuda-bs', type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = []
    if a.device in ('cpu', 'all'):
        print('== cpu: seed setup', flush=True)
        model, x = seed_setup()
        results.append(compare(model, x, a.rounds, a.n_repeat, a.min_us))
    if a.device in ('cuda', 'all'):
        if torch.cuda.is_available():
            print('== cuda: resnet50', flush=True)
            torch.manual_seed(0)
            model = torchvision.models.resnet50().eval().cuda()
            results.append(compare(model, torch.randn(a.cuda_bs, 3, 224, 224, device='cuda'), a.rounds, a.n_repeat, a.min_us))
        else: print('no CUDA device: GPU variant skipped')
    OUT.mkdir(exist_ok=True)
    (OUT/'accuracy_vs_profiler.json').write_text(json.dumps(results, indent=1))
    md = markdown(results); (OUT/'accuracy_vs_profiler.md').write_text(md)
    print(md)
