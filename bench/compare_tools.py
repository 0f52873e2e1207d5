"""cnn_cost side by side with the other tools that count or time a model, on the same batches (CPU).

Setups: the seed's (fastai `vision_learner` resnet18 on a real 64 x 3 x 28 x 28 batch of digits), torchvision resnet50 and mobilenet_v2 at 224.
Tools: cnn_cost (`model_cost`, its defaults), torchinfo `summary`, fvcore `FlopCountAnalysis`, ptflops (pytorch and aten backends),
`torch.utils.flop_counter.FlopCounterMode`, DeepSpeed's flops profiler (where it imports), `torch.profiler` (per-module events
via `with_stack`/`with_modules`, `record_shapes`, `with_flops`).
For each: the MACs it reports and its wall time as a multiple of one plain forward. Every tool call is paired with a plain forward
just before it, tools run in a rotating order, `--rounds` times: we report the median (min-max) of the paired ratios.
For the tools that time layers (cnn_cost, DeepSpeed, torch.profiler): the extra time of one instrumented forward over a plain one
(paired, interleaved in the same way), per module call they time. That extra time does not depend on the batch, but on this shared
2-core machine it drowns in the noise of a large batch's forward, so it is measured on a forward that is mostly per-module work: the first sample of
the batch, resized to at most `--overhead-size` pixels (`--overhead-rounds` pairs); the instrumented/plain ratio is reported on both.
cnn_cost's instrumented forward is its own: `model_cost(..., n_repeat=k)` times a hooked and a plain pass back to back in every round
(`hooked_ms`, `plain_ms`), the pairs this script makes for the other tools.
Run: python bench/compare_tools.py [--rounds 5] [--setups seed,resnet50,mobilenet_v2] [--out DIR]; writes DIR/compare_tools.{json,md} (default bench/out).
A smoke run (a few minutes, numbers meaningless): --setups seed --rounds 1 --overhead-rounds 2 --out /tmp/ct
The other tools: pip install torchinfo fvcore ptflops (deepspeed optional); a tool that does not import is listed as failed."""
import argparse, inspect, io, json, time, contextlib, warnings, logging, platform
from pathlib import Path
import numpy as np, torch, torch.nn as nn, torchvision
from torch.utils.flop_counter import FlopCounterMode
from cnn_cost.learner import model_cost   # public names from their modules: no private helper, whatever `cnn_cost.all` exports
from cnn_cost.data import digits_dls

warnings.filterwarnings('ignore')
OUT = Path(__file__).parent/'out'

def seed_setup():
    from fastai.vision.all import vision_learner, resnet18
    dls = digits_dls()
    return vision_learner(dls, resnet18, pretrained=False, n_out=10).model.eval(), dls.train.one_batch()[0].cpu()

def tv_setup(name, bs):
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval(), torch.randn(bs, 3, 224, 224)

def quiet():
    "Silence a tool's prints (ptflops and DeepSpeed print even when asked not to)"
    s = contextlib.ExitStack(); s.enter_context(contextlib.redirect_stdout(io.StringIO())); return s

# ---- the tools: each runs as a user would, on `model` and batch `x`, and returns what it reports ----
def t_cnn_cost(model, x):
    s = model_cost(model, x)  # its defaults, as a user calls it: timed rounds until the row times settle
    return {'macs': int(s.total_macs), 'n_passes': s.n_passes, 'note': f'{s.n_passes} forward passes in all (counting, timed rounds)'}

def t_torchinfo(model, x):
    from torchinfo import summary
    s = summary(model, input_data=[x], verbose=0)
    return {'macs': int(s.total_mult_adds)}

def t_fvcore(model, x):
    from fvcore.nn import FlopCountAnalysis
    fa = FlopCountAnalysis(model, (x,)).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    tot, ops = fa.total(), dict(fa.by_operator())
    mm = sum(v for k,v in ops.items() if k in ('conv', 'linear', 'addmm', 'matmul', 'bmm', 'einsum', 'mm'))
    return {'macs': int(tot), 'macs_conv_matmul_only': int(mm), 'by_operator': {k:int(v) for k,v in ops.items()}}

def _ptflops(backend):
    def f(model, x):
        from ptflops import get_model_complexity_info
        with quiet():
            macs, params = get_model_complexity_info(model, tuple(x.shape[1:]), as_strings=False, print_per_layer_stat=False,
                                                     input_constructor=lambda _: x, backend=backend, verbose=False)
        return {'macs': int(macs), 'macs_x_bs': int(macs*x.shape[0]) if backend=='pytorch' else None}
    return f

def t_flop_counter(model, x):
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model(x)
    return {'macs': fc.get_total_flops()//2}

def t_deepspeed(model, x):
    from deepspeed.profiling.flops_profiler import get_model_profile
    with quiet(): flops, macs, params = get_model_profile(model, args=[x], print_profile=False, detailed=False, warm_up=1, as_string=False)
    return {'macs': int(macs), 'note': 'warm-up forward + profiled forward'}

def t_torch_profiler(model, x):
    from torch.profiler import profile, ProfilerActivity
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True, with_modules=True, with_flops=True) as p: model(x)
    ev = p.events()  # post-processing: a user needs it to see anything
    tbl = ev.key_averages().table(sort_by='self_cpu_time_total', row_limit=20)
    return {'macs': int(sum(e.flops for e in ev if e.flops)//2), 'n_module_events': sum(e.name.startswith('nn.Module') for e in ev),
            'note': 'with_flops counts conv/mm ops only'}

TOOLS = {'cnn_cost': t_cnn_cost, 'torchinfo': t_torchinfo, 'fvcore': t_fvcore, 'ptflops (pytorch)': _ptflops('pytorch'),
         'ptflops (aten)': _ptflops('aten'), 'torch flop_counter': t_flop_counter, 'deepspeed': t_deepspeed, 'torch.profiler': t_torch_profiler}

# ---- instrumented forwards of the tools that time layers, for their cost per timed module call ----
def module_calls(model, x):
    "How many module calls (containers included) one forward makes"
    n = [0]; hs = [m.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0]+1)) for m in model.modules()]
    try:
        with torch.no_grad(): model(x)
    finally:
        for h in hs: h.remove()
    return n[0]

def cnn_cost_pairs(model, x, n):
    "cnn_cost's hooked and plain forwards, timed back to back by `model_cost` itself over `n` rounds: (extra ms, plain ms) per round, timed module calls"
    s = model_cost(model, x, n_repeat=n)
    h,p = np.array(s.hooked_ms),np.array(s.plain_ms)
    return list(zip(h-p, p)), int(s.df.calls.sum())

def instrumented(model, x):
    "name -> (fn() returning the ms of one instrumented forward, module calls it times), for the tools other than cnn_cost"
    fwd, res = (lambda: model(x)), {}
    n_all = module_calls(model, x)
    try:
        from deepspeed.profiling.flops_profiler import FlopsProfiler
        def ds():
            prof = FlopsProfiler(model); prof.start_profile()
            try: a = time.perf_counter_ns(); fwd(); b = time.perf_counter_ns()
            finally: prof.stop_profile(); prof.end_profile()
            return (b-a)/1e6
        res['deepspeed'] = (ds, n_all)
    except Exception as e: print('deepspeed unavailable:', repr(e)[:200])
    from torch.profiler import profile, ProfilerActivity
    def tp():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True, with_modules=True):
            a = time.perf_counter_ns(); fwd(); b = time.perf_counter_ns()
        return (b-a)/1e6
    res['torch.profiler'] = (tp, n_all)
    return res

def plain_ms(model, x): a = time.perf_counter_ns(); model(x); return (time.perf_counter_ns()-a)/1e6
def stats(r): r = np.asarray(r); return {'median': float(np.median(r)), 'min': float(r.min()), 'max': float(r.max()), 'n': len(r)}

def bench(name, model, x, rounds, overhead_rounds=40, overhead_size=32):
    print(f'== {name}: {type(model).__name__} {tuple(x.shape)}', flush=True)
    with torch.no_grad():
        for _ in range(2): model(x)
    res = {'setup': name, 'model': type(model).__name__, 'input': list(x.shape), 'tools': {}}
    ratios, reports, tools = {k:[] for k in TOOLS}, {}, list(TOOLS)
    for r in range(rounds):
        for k in tools[r % len(tools):] + tools[:r % len(tools)]:
            if k in reports and 'error' in reports[k]: continue
            with torch.no_grad(): p = plain_ms(model, x)
            try:
                a = time.perf_counter_ns(); rep = TOOLS[k](model.eval(), x); w = (time.perf_counter_ns()-a)/1e6
            except Exception as e: reports[k] = {'error': repr(e)[:300]}; print(f'  {k}: failed: {e!r}'[:300]); continue
            reports[k] = rep; ratios[k].append(w/p)
        print(f'  round {r+1}/{rounds} done', flush=True)
    for k in tools: res['tools'][k] = {**reports.get(k, {}), **({'wall_x_forward': stats(ratios[k])} if ratios[k] else {})}
    # cost per timed module call, paired with plain forwards, interleaved
    ins = instrumented(model, x)
    extra = {k:[] for k in ins}
    with torch.no_grad():
        for r in range(max(rounds, 5)):
            for k,(f,n) in (list(ins.items()) if r%2 else list(ins.items())[::-1]):
                p = plain_ms(model, x); extra[k].append((f()-p, p))
    pairs,n = cnn_cost_pairs(model, x, max(rounds, 5))
    extra['cnn_cost'],ins = pairs,{'cnn_cost': (None, n), **ins}
    for k,(f,n) in ins.items():
        d = np.array([e for e,_ in extra[k]]); p = np.array([p for _,p in extra[k]])
        res['tools'][k]['timed_module_calls'] = n
        res['tools'][k]['instrumented_fwd_x_plain'] = stats((d+p)/p)
    res['plain_forward_ms'] = stats([p for v in extra.values() for _,p in v])
    x1 = x[:1] if x.shape[-1]<=overhead_size else torch.nn.functional.interpolate(x[:1], size=overhead_size)
    ins = instrumented(model, x1)
    extra = {k:[] for k in ins}
    with torch.no_grad():
        for _ in range(3): model(x1)
        for r in range(overhead_rounds):
            for k,(f,n) in (list(ins.items()) if r%2 else list(ins.items())[::-1]):
                p = plain_ms(model, x1); extra[k].append((f()-p, p))
    pairs,n = cnn_cost_pairs(model, x1, overhead_rounds)
    extra['cnn_cost'],ins = pairs,{'cnn_cost': (None, n), **ins}
    for k,(f,n) in ins.items():
        d = np.array([e for e,_ in extra[k]]); p = np.array([p for _,p in extra[k]])
        res['tools'][k]['instrumented_fwd_x_plain_bs1'] = stats((d+p)/p)
        res['tools'][k]['us_per_timed_call'] = stats(d*1e3/n)
    res['overhead_size'] = overhead_size
    res['plain_forward_ms_bs1'] = stats([p for v in extra.values() for _,p in v])
    return res

def fmt_s(s, f='{:.2f}'): return f"{f.format(s['median'])} ({f.format(s['min'])}–{f.format(s['max'])})" if s else ''
def fmt_macs(m): return '' if m is None else f'{m/1e9:,.4f} G'

def markdown(results):
    lines = [f"CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {platform.processor() or platform.machine()}. "
             "Times: median (min–max) of paired ratios over the rounds.", '']
    for res in results:
        lines += [f"### {res['setup']}: {res['model']} on {'x'.join(map(str, res['input']))} (plain forward {fmt_s(res['plain_forward_ms'], '{:.1f}')} ms; "
                  f"1 sample at {min(res['input'][-1], res['overhead_size'])} px: {fmt_s(res['plain_forward_ms_bs1'], '{:.2f}')} ms)", '',
                  '| tool | MACs reported | wall time / plain forward | instrumented forward / plain | same, 1 small sample | µs per timed module call (calls) |',
                  '|---|---:|---:|---:|---:|---:|']
        for k,t in res['tools'].items():
            if 'error' in t: lines.append(f"| {k} | failed: {t['error'][:80]} | | | | |"); continue
            m = fmt_macs(t.get('macs'))
            if t.get('macs_x_bs') is not None: m += f" per sample; ×bs = {fmt_macs(t['macs_x_bs'])}"
            if t.get('macs_conv_matmul_only') is not None: m += f" (conv+matmul only {fmt_macs(t['macs_conv_matmul_only'])})"
            if t.get('n_passes') is not None: m += f" ({t['n_passes']} forward passes)"
            calls = f" ({t['timed_module_calls']})" if 'timed_module_calls' in t else ''
            lines.append(f"| {k} | {m} | {fmt_s(t.get('wall_x_forward'))} | {fmt_s(t.get('instrumented_fwd_x_plain'), '{:.3f}')} | "
                         f"{fmt_s(t.get('instrumented_fwd_x_plain_bs1'), '{:.3f}')} | "
                         f"{fmt_s(t.get('us_per_timed_call'), '{:.1f}')}{calls} |")
        lines.append('')
    return '\n'.join(lines)

if __name__ == '__main__':
    logging.disable(logging.WARNING)
    ap = argparse.ArgumentParser()
    ap.add_argument('--rounds', type=int, default=5); ap.add_argument('--bs', type=int, default=8); ap.add_argument('--overhead-rounds', type=int, default=40)
    ap.add_argument('--overhead-size', type=int, default=32)
    ap.add_argument('--setups', default='seed,resnet50,mobilenet_v2')
    ap.add_argument('--threads', type=int, default=1, help='torch threads: 1 keeps timings stable when the cores are shared')
    ap.add_argument('--out', default=str(OUT), help='folder for compare_tools.json and .md')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    OUT = Path(a.out)
    builders = {'seed': seed_setup, 'resnet50': lambda: tv_setup('resnet50', a.bs), 'mobilenet_v2': lambda: tv_setup('mobilenet_v2', a.bs)}
    f = OUT/'compare_tools.json'
    # setups run before and not re-run now are kept, so that one setup can be re-measured alone
    results = [r for r in (json.loads(f.read_text()) if f.exists() else []) if r['setup'] in builders and r['setup'] not in a.setups.split(',')]
    for s in a.setups.split(','):
        model, x = builders[s]()
        results.append(bench(s, model, x, a.rounds, a.overhead_rounds, a.overhead_size))
        results.sort(key=lambda r: list(builders).index(r['setup']))
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT/'compare_tools.json').write_text(json.dumps(results, indent=1))
        md = markdown(results); (OUT/'compare_tools.md').write_text(md)
    print(md)
