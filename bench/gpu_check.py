"""The CUDA half in one command (issue 19): everything cnn_cost says about a GPU, checked against PyTorch's own tools in one short run.

    python bench/gpu_check.py              # on a CUDA GPU: every part in priority order within --budget seconds (default 420)
    python bench/gpu_check.py --dry-run    # on any machine: the same code on the CPU at small sizes; only what needs CUDA is skipped
    make gpu-wheels && make gpu-dry-run    # here first: fastai and nbdev as wheels into .whl/ (the GPU image has neither), then the CPU dry run
    device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560), then give_back; the reply's files hold the results

Parts, in priority order; each is skipped (and says so) once the budget is spent, and a part that fails logs its traceback and the rest go on:
1. truth: per-layer forward and backward time of real fastai training batches (`CostProfiler`, every other batch) against `torch.profiler`'s
   kernel time of the batches between them, charged to the same layers (tests/profiler_refs.py: ranges in the forward, autograd sequence
   numbers in the backward); resnet50 64 x 3 x 224², fp32 and `to_fp16()`, and the seed setup (fastai resnet18, 64 real digits at 28²);
   `cost_summary`'s eval forward of resnet50 against the profiler too (bench/accuracy_vs_profiler.py's `compare`).
2. starved: how busy the GPU was in the profiled batches of part 1 (`kernel_busy_us` / wall) beside the rows' launch share; and the launch
   queue as `CUDAClock.queue_ms` reads it on an idle GPU (noise, drift) and at every stamp on a model that starves the GPU and on one that does not.
3. memory: predicted peak vs `torch.cuda.max_memory_allocated` (resnet50, vit_b_16; fp32, fp16); predicted largest batch vs trial under a
   memory cap; the checkpointing plan's peak, predicted vs real.
4. overhead: hooked / plain forward (resnet50 bs64 224², `model_cost`'s paired rounds); profiled / unprofiled training batch (`every=2`).
5. tests: `pytest -m cuda` and the notebooks with `#| cuda` cells (nbdev-test --flags cuda, where nbdev is installed).
6. tools: plain forward vs `torch.profiler` and `FlopCounterMode` around it (paired), and which of them give per-layer backward time.
Writes gpu_check.json (every figure), gpu_check.md (the tables for BENCHMARKS.md), gpu_check.log, the logs of part 5 and traces.tar.gz (a chrome
trace of one profiled batch per setup) to --out (default $OUT, else bench/out/gpu): at most 7 files, as the device tool brings back 8."""
import sys, os, json, time, platform, argparse, warnings, traceback, subprocess, tarfile, logging, importlib.util
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT/'tests'), str(ROOT/'bench')]
warnings.filterwarnings('ignore')
logging.disable(logging.WARNING)
import numpy as np, torch, torch.nn as nn, torchvision
import cnn_cost.all  # patches Learner: cost_summary, memory_summary, max_batch, memory_plan, checkpoint

A = None  # the parsed arguments
T0 = time.perf_counter()
LOG = []
def log(*a):
    s = ' '.join(map(str, a)); print(f'[{time.perf_counter()-T0:6.1f}s] {s}', flush=True); LOG.append(s)
def left(): return A.budget-(time.perf_counter()-T0)

def dev(): return 'cpu' if A.dry_run else 'cuda'
def sync():
    if dev()=='cuda': torch.cuda.synchronize()

# ---------------------------------------------------------------- setups
def seed_learner():
    "The seed's setup: fastai `vision_learner` resnet18 on the embedded digits, 64 x 3 x 28 x 28"
    from fastai.vision.all import vision_learner, resnet18
    from cnn_cost.data import digits_dls
    torch.manual_seed(0)
    return vision_learner(digits_dls(device=dev()), resnet18, pretrained=False, n_out=10)

def tv(name, bs, size, n_batches, fp16=False):
    "torchvision `name` in a fastai `Learner` on random data on the device (fp16: `to_fp16()`)"
    from memory_refs import tv_learner
    learn = tv_learner(name, bs, size, device=dev(), n_batches=n_batches); learn.model.to(dev())
    return learn.to_fp16() if fp16 else learn

def setups():
    "(label, make learner) of part 1; small on the CPU"
    if A.dry_run: return [('seed resnet18 64x3x28x28 fp32', seed_learner), ('resnet50 2x3x64x64 fp32', lambda: tv('resnet50', 2, 64, 12))]
    return [('resnet50 64x3x224x224 fp32', lambda: tv('resnet50', 64, 224, 12)),
            ('resnet50 64x3x224x224 to_fp16', lambda: tv('resnet50', 64, 224, 12, fp16=True)),
            ('seed resnet18 64x3x28x28 fp32', seed_learner)]

# ---------------------------------------------------------------- part 1 and 2: per-layer truth, starved GPU
def compare_rows(s, ref, min_us):
    "Rows of a `CostProfiler` summary `s` beside the profiler's medians `ref` ({'fwd': {name: µs}, 'bwd': ...}); stats of those above `min_us`"
    df = s.df
    timed = dict(fwd=set(df.name[df.time_ms.notna()]), bwd=set(df.name[df.bwd_ms.notna()]) if 'bwd_ms' in df else set())  # rows with a time in that pass
    rows = []
    for _,r in df.iterrows():
        f,b = ref['fwd'].get(r['name']),ref['bwd'].get(r['name'])
        bw = r.get('bwd_ms', np.nan)
        rows.append(dict(name=r['name'], type=r['type'], cc_fwd_ms=float(r.time_ms), ref_fwd_ms=(f or 0.)/1e3, cc_bwd_ms=float(bw) if bw==bw else None,
                         ref_bwd_ms=(b or 0.)/1e3))
    def stats(k):
        big = [(x[f'cc_{k}_ms'], x[f'ref_{k}_ms']) for x in rows if x[f'ref_{k}_ms']*1e3>=min_us and x[f'cc_{k}_ms'] is not None]
        rat = np.array([a/b for a,b in big]) if big else np.array([np.nan])
        tot = sum(ref[k].values())
        return dict(n_above=len(big), within_10pct=int((abs(rat-1)<=0.1).sum()), ratio_median=float(np.nanmedian(rat)),
                    ratio_min=float(np.nanmin(rat)), ratio_max=float(np.nanmax(rat)),
                    ref_covered=sum(v for n,v in ref[k].items() if n in timed[k])/tot if tot else np.nan,  # profiler time in modules with a timed row
                    cc_sum_ms=float(np.nansum([x[f'cc_{k}_ms'] or 0 for x in rows])), ref_sum_ms=tot/1e3)
    return rows, dict(fwd=stats('fwd'), bwd=stats('bwd'))

def truth_one(label, make, trace_dir):
    from cnn_cost.callback import CostProfiler
    from profiler_refs import RefProfiler, median_split
    learn = make(); n = 5
    cp,rp = CostProfiler(skip=2, every=2, n_batches=n),RefProfiler(start=3, every=2, n_batches=n, trace_dir=trace_dir)
    need = 2+2*n+1
    nb = len(learn.dls.train)
    epochs = -(-need//nb)
    with learn.no_logging(), learn.no_bar(): learn.fit(epochs, cbs=[cp, rp])
    s = cp.summary()
    ref = dict(fwd=median_split(rp.results, 'fwd'), bwd=median_split(rp.results, 'bwd'))
    rows,st = compare_rows(s, ref, A.min_us)
    busy = [r['busy_us']/r['wall_us'] for r in rp.results]
    shared = [(sum(r['fwd'].values())+sum(r['bwd'].values())+r['loss']+r['outside'])/r['kernel_us'] for r in rp.results if r['kernel_us']==r['kernel_us']]
    plain = None
    if dev()=='cuda':  # the GPU's busy share in plain training batches: no hook, no range, only the device's activities recorded
        bp = RefProfiler(start=2, every=1, n_batches=3, modules=False)
        with learn.no_logging(), learn.no_bar(): learn.fit(-(-5//nb), cbs=bp)
        plain = float(np.median([r['busy_us']/r['wall_us'] for r in bp.results]))
    res = dict(setup=label, device=str(s.device), batches_cc=len(s.steps), batches_ref=len(rp.results), stats=st, rows=rows, notes=list(s.notes),
               ref_loss_ms=float(np.median([r['loss'] for r in rp.results]))/1e3, ref_outside_ms=float(np.median([r['outside'] for r in rp.results]))/1e3,
               gpu_busy_share=float(np.median(busy)) if busy and busy[0]==busy[0] else None, gpu_busy_share_plain=plain,
               kernel_time_attributed=float(np.median(shared)) if shared else None,  # every kernel's time charged to some op (1.0), none twice
               launch_share=float(s.launch_share), bwd_launch_share=float(s.bwd_launch_share))
    log(f"  {label}: fwd {st['fwd']['within_10pct']}/{st['fwd']['n_above']} rows within 10% (median {st['fwd']['ratio_median']:.3f}), "
        f"bwd {st['bwd']['within_10pct']}/{st['bwd']['n_above']} (median {st['bwd']['ratio_median']:.3f}); profiler time in rows: "
        f"fwd {st['fwd']['ref_covered']:.4f}, bwd {st['bwd']['ref_covered']:.4f}; GPU busy {res['gpu_busy_share']} (plain batches {plain}); kernel time attributed {res['kernel_time_attributed']}; launch share fwd {res['launch_share']:.3f} bwd {res['bwd_launch_share']:.3f}")
    return res

def part_truth(out):
    res = []
    for label,make in setups():
        if left()<60: log(f'  {label}: skipped, budget'); res.append(dict(setup=label, skipped='budget')); continue
        try: res.append(truth_one(label, make, out))
        except Exception: log(traceback.format_exc()); res.append(dict(setup=label, error=traceback.format_exc()))
        if dev()=='cuda': torch.cuda.empty_cache()
    if left()>60:  # cost_summary's eval forward against the profiler (hooked/plain ratio too)
        from accuracy_vs_profiler import compare
        torch.manual_seed(0)
        bs,size = (2,64) if A.dry_run else (64,224)
        m = torchvision.models.resnet50().eval().to(dev())
        r = compare(m, torch.randn(bs, 3, size, size, device=dev()), 2, 6, A.min_us)
        log(f"  cost_summary eval forward resnet50: {r['within_10pct']}/{r['n_layers_above_min']} layers within 10% (median {r['ratio_median']:.3f})")
        res.append(dict(setup=f'cost_summary eval forward resnet50 {bs}x3x{size}x{size}', eval_forward=r))
        s = __import__('cnn_cost.learner', fromlist=['model_cost']).model_cost(m, torch.randn(bs, 3, size, size, device=dev()), n_repeat=4)
        res[-1].update(notes=list(s.notes), launch_share=float(s.launch_share), bwd_launch_share=float(s.bwd_launch_share))
        del m
    return res

def part_starved(out):
    "The launch queue as `CUDAClock.queue_ms` reads it on an idle GPU (its noise and drift) and at every stamp of a hooked pass, on a model that starves the GPU and on one that does not, beside the profiler's GPU busy share"
    from cnn_cost.timing import TimeHooks, clock_for, busy_margin_ms
    from torch.profiler import profile, ProfilerActivity
    from profiler_refs import kernel_busy_us
    torch.manual_seed(0)
    bs,size = (2,64) if A.dry_run else (64,224)
    cases = {'50 x Linear(8,8), batch 4': (nn.Sequential(*[nn.Linear(8, 8) for _ in range(50)]), torch.randn(4, 8)),
             f'resnet50 {bs}x3x{size}²': (torchvision.models.resnet50().eval(), torch.randn(bs, 3, size, size))}
    res = {}
    if dev()=='cuda':  # an idle GPU: events 50 ms apart should read a queue of about 0; their spread and drift bound the error of `CUDAClock.busy`
      try:
        clock = clock_for('cuda'); clock.sync(); clock.reset(); st = []
        for _ in range(21): st.append(clock.stamp()); time.sleep(0.05)
        clock.sync()
        q = np.array([clock.queue_ms(e) for e in st]); h = np.array([(e.host-st[0].host0)/1e9 for e in st])
        res['idle GPU, 21 events 50 ms apart'] = dict(queue_ms_min=float(q.min()), queue_ms_max=float(q.max()), queue_ms_p50=float(np.median(q)),
                                                       drift_us_per_s=float(np.polyfit(h, q*1e3, 1)[0]), busy_margin_ms=busy_margin_ms,
                                                       host_reads='before and after each record')
        log(f"  idle calibration: {res['idle GPU, 21 events 50 ms apart']}")
      except Exception: log(traceback.format_exc())
    for name,(m,x) in cases.items():
      try:
          m,x = m.to(dev()),x.to(dev())
          mods = list(m.modules()); clock = clock_for(dev())
          with torch.no_grad(), TimeHooks(mods, clock) as th:
              for _ in range(4): clock.sync(); th.start(); m(x); ts = th.times()
              q = np.array([clock.queue_ms(t) for t,_ in th.marks]) if dev()=='cuda' else np.array([np.nan])
          with torch.no_grad():
              sync()
              with profile(activities=[ProfilerActivity.CUDA] if dev()=='cuda' else [ProfilerActivity.CPU]) as p:
                  t = time.perf_counter(); m(x); sync(); wall = (time.perf_counter()-t)*1e6
          busy = kernel_busy_us(p)/wall if dev()=='cuda' else None
          ln = np.sum(th.launch)/sum(ts)  # NaN on a CPU: no launch queue
          hq = np.array([clock.host_ms(a, b) for (a,_),(b,_) in zip(th.marks, th.marks[1:])]) if dev()=='cuda' else np.array([np.nan])
          res[name] = dict(stamps=len(q), queue_ms_min=float(np.nanmin(q)), queue_ms_p10=float(np.nanpercentile(q, 10)), queue_ms_p50=float(np.nanmedian(q)),
                           queue_ms_p90=float(np.nanpercentile(q, 90)), queue_ms_max=float(np.nanmax(q)), stretch_host_ms_p50=float(np.nanmedian(hq)),
                           launch_share=float(ln), gpu_busy_share=busy)
          log(f'  {name}: {res[name]}')
      except Exception: log(traceback.format_exc()); res[name] = dict(error=traceback.format_exc())
    return res

# ---------------------------------------------------------------- part 3: memory
def part_memory(out):
    from memory_refs import cuda_peak, trial_max_batch
    res = dict(peaks=[], batch=None, plan=None)
    models,bs = (['resnet18'],2) if A.dry_run else (['resnet50','vit_b_16'],64)
    for name in models:
        for fp16 in (False, True):
            if left()<40: res['peaks'].append(dict(model=name, skipped='budget')); continue
            learn = tv(name, bs, 224 if not A.dry_run else 64, 2, fp16)
            t = time.perf_counter(); ms = learn.memory_summary(device='cuda'); t = time.perf_counter()-t
            real = cuda_peak(learn) if dev()=='cuda' else None
            r = dict(model=name, bs=bs, dtype='fp16' if fp16 else 'fp32', predicted=int(ms.peak), max_memory_allocated=real,
                     error=ms.peak/real-1 if real else None, predict_s=t, reserved=torch.cuda.max_memory_reserved() if real else None)
            log(f'  peak {r}'); res['peaks'].append(r)
            del learn
            if dev()=='cuda': torch.cuda.empty_cache()
    if left()>90:  # largest batch under a cap of `cap` GiB: the prediction against doubling-then-bisecting real steps with the allocator capped
        cap = 8.
        size = 64 if A.dry_run else 224
        learn = tv('resnet50', 8, size, 1)
        mb = learn.max_batch(budget=cap, device='cuda', show_plot=False); del learn
        trial = None
        if dev()=='cuda':
            torch.cuda.empty_cache(); frac = cap*2**30/torch.cuda.get_device_properties(0).total_memory
            log(f'  before the trial: {torch.cuda.memory_allocated():,} B allocated, {torch.cuda.memory_reserved():,} B reserved (count against the cap)')
            torch.cuda.set_per_process_memory_fraction(frac)
            try: trial = trial_max_batch(lambda b: tv('resnet50', b, size, 1), start=16, max_bs=4096)
            finally: torch.cuda.set_per_process_memory_fraction(1.); torch.cuda.empty_cache()
        res['batch'] = dict(model=f'resnet50 {size}²', budget_gib=cap, predicted_bs=mb.bs, trial_bs=trial, error=mb.bs/trial-1 if trial else None,
                            how='torch.cuda.set_per_process_memory_fraction caps what the caching allocator may reserve')
        log(f"  max batch {res['batch']}")
    if left()>60:  # the checkpointing plan at a budget the plain step exceeds
        size,bs = (64,4) if A.dry_run else (224,128)
        learn = tv('resnet50', bs, size, 2)
        base = learn.memory_summary(device='cuda').peak
        plan = learn.memory_plan(budget=0.7*base/2**30, device='cuda', show_plot=False)
        k = plan['checkpointing'] if any(o.name=='checkpointing' for o in plan.options) else None
        if k is not None:
            learn.checkpoint(k)
            pred = learn.memory_summary(device='cuda').peak
            real = cuda_peak(learn) if dev()=='cuda' else None
            res['plan'] = dict(model=f'resnet50 {bs}x3x{size}²', budget=int(0.7*base), unplanned_pred=int(base), blocks=len(k.blocks), plan_peak=int(k.peak),
                               plan_fits_budget=bool(k.fits),
                               summary_peak=int(pred), max_memory_allocated=real, error=pred/real-1 if real else None)
        else: res['plan'] = dict(note='the plan suggested no checkpointing', options=[o.name for o in plan.options])
        log(f"  plan {res['plan']}")
    return res

# ---------------------------------------------------------------- part 4: overhead
def part_overhead(out):
    from fastai.vision.all import Callback
    from cnn_cost.learner import model_cost
    from cnn_cost.callback import CostProfiler
    res = {}
    bs,size = (2,64) if A.dry_run else (64,224)
    torch.manual_seed(0)
    m = torchvision.models.resnet50().eval().to(dev()); x = torch.randn(bs, 3, size, size, device=dev())
    s = model_cost(m, x, n_repeat=10)
    r = np.array(s.hooked_ms)/np.array(s.plain_ms)
    res['hooked_over_plain'] = dict(setup=f'resnet50 {bs}x3x{size}²', median=float(np.median(r)), min=float(r.min()), max=float(r.max()), n=len(r),
                                    plain_ms=float(np.median(s.plain_ms)))
    log(f"  hooked/plain forward {res['hooked_over_plain']}")
    del m
    class StepTimes(Callback):
        "Every training batch's time from `before_batch` to `after_batch` (events on CUDA, synchronized after the batch, never inside it)"
        order = 100
        def before_fit(self): self.ts = []
        def before_batch(self):
            if dev()=='cuda': self.a = torch.cuda.Event(enable_timing=True); self.a.record()
            else: self.a = time.perf_counter_ns()
        def after_batch(self):
            if dev()=='cuda': b = torch.cuda.Event(enable_timing=True); b.record(); b.synchronize(); self.ts.append(self.a.elapsed_time(b))
            else: self.ts.append((time.perf_counter_ns()-self.a)/1e6)
    learn = tv('resnet50', bs, size, 16); st = StepTimes()
    cp = CostProfiler(skip=3, every=2, n_batches=6)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, cbs=[cp, st])
    ts,prof = st.ts,{b['iter'] for b in cp.batches}
    ok = lambda j: j not in prof and j>cp.counted_iter  # a neighbour neither profiled nor the MAC-counting batch
    rat = [ts[i]/((ts[i-1]+ts[i+1])/2) for i in sorted(prof) if 0<i<len(ts)-1 and ok(i-1) and ok(i+1)]
    res['profiled_over_unprofiled'] = dict(setup=f'resnet50 {bs}x3x{size}² training batch', median=float(np.median(rat)), min=float(min(rat)),
                                           max=float(max(rat)), n=len(rat), step_ms=float(np.median([ts[i] for i in range(len(ts)) if i not in prof and i>2])))
    log(f"  profiled/unprofiled batch {res['profiled_over_unprofiled']}")
    return res

# ---------------------------------------------------------------- part 5: the cuda tests and notebooks
def part_tests(out):
    res = {}
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    def run(name, cmd, timeout):
        t = time.perf_counter()
        try: p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout); rc,txt = p.returncode,p.stdout+p.stderr
        except subprocess.TimeoutExpired as e: rc,txt = 'timeout',f'{e.stdout or ""}{e.stderr or ""}'
        (out/f'{name}.log').write_text(txt if isinstance(txt, str) else txt.decode())
        res[name] = dict(cmd=' '.join(cmd), rc=rc, seconds=time.perf_counter()-t, tail=str(txt)[-600:])
        log(f'  {name}: rc {rc} in {res[name]["seconds"]:.0f}s')
    run('pytest_cuda', [sys.executable, '-m', 'pytest', '-q', '-m', 'cuda', 'tests', '-p', 'no:cacheprovider'], max(30, min(150, left()-30)))
    if importlib.util.find_spec('nbdev') is None: res['nbdev_cuda'] = dict(skipped='nbdev is not installed here')
    elif left()>60:
        run('nbdev_cuda', ['nbdev-test', *([] if A.dry_run else ['--flags', 'cuda']), '--n-workers', '4', '--file-re', r'^(02_timing|06_callback|08_analysis|index)\.ipynb$', 'nbs'],
            max(30, left()-20))
    return res

# ---------------------------------------------------------------- part 6: other tools on the same GPU
def part_tools(out):
    from torch.profiler import profile, ProfilerActivity
    from torch.utils.flop_counter import FlopCounterMode
    bs,size = (2,64) if A.dry_run else (64,224)
    torch.manual_seed(0)
    m = torchvision.models.resnet50().eval().to(dev()); x = torch.randn(bs, 3, size, size, device=dev())
    acts = [ProfilerActivity.CPU]+[ProfilerActivity.CUDA]*(dev()=='cuda')
    def plain(): m(x)
    def prof():
        with profile(activities=acts): m(x); sync()
    def flops():
        with FlopCounterMode(display=False): m(x)
    def t(f):
        sync(); a = time.perf_counter(); f(); sync(); return time.perf_counter()-a
    with torch.no_grad():
        for f in (plain, prof, flops): f(); f()
        rs = {'torch.profiler': [], 'FlopCounterMode': []}
        for i in range(5):
            for k,f in (('torch.profiler', prof), ('FlopCounterMode', flops)):
                p = t(plain); rs[k].append(t(f)/p)
    res = {k: dict(median=float(np.median(v)), min=float(min(v)), max=float(max(v)), n=len(v)) for k,v in rs.items()}
    res['per_layer_backward'] = {'torch.profiler': 'yes, with module ranges and autograd sequence numbers (tests/profiler_refs.py)',
                                 'FlopCounterMode': 'no: counts, no time', 'cnn_cost': 'yes (CostProfiler)'}
    log(f'  tools {res}')
    return res

# ---------------------------------------------------------------- report
def fmt(v, pct=False):
    if v is None: return '–'
    if isinstance(v, float): return f'{v:+.2%}' if pct else f'{v:.3f}'
    return f'{v:,}' if isinstance(v, int) else str(v)

def markdown(R):
    L = [f"Device: {R['device']}; torch {R['torch']}, fastai {R['fastai']}; {R['date']}" + ('; DRY RUN on the CPU (small sizes, nothing on CUDA)' if R['dry_run'] else ''), '']
    truth = [t for t in R.get('truth') or [] if isinstance(t, dict)]
    if truth:
        L += ['### Per-layer time against the profiler', '',
              '| setup | pass | rows ≥ 50 µs | within 10% | cnn_cost / profiler, median (min–max) | profiler time in rows | rows sum / profiler sum (ms) |',
              '|---|---|---:|---:|---|---:|---|']
        for t in truth:
            if 'stats' in t:
                for k in ('fwd', 'bwd'):
                    s = t['stats'][k]
                    L.append(f"| {t['setup']} | {'forward' if k=='fwd' else 'backward'} | {s['n_above']} | {s['within_10pct']} | {s['ratio_median']:.3f} "
                             f"({s['ratio_min']:.3f}–{s['ratio_max']:.3f}) | {s['ref_covered']:.2%} | {s['cc_sum_ms']:.2f} / {s['ref_sum_ms']:.2f} |")
            elif 'eval_forward' in t:
                r = t['eval_forward']
                L.append(f"| {t['setup']} | eval forward (`cost_summary`) | {r['n_layers_above_min']} | {r['within_10pct']} | {r['ratio_median']:.3f} "
                         f"({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) | | {r['sum_cnn_cost_ms']:.2f} / {r['sum_profiler_ms']:.2f} |")
            else: L.append(f"| {t['setup']} | {t.get('skipped') or 'error: see gpu_check.log'} | | | | | |")
        L += ['', '### GPU waiting for the host', '', '| setup | GPU busy / wall, batches without ranges (CUPTI on) | with the profiler\'s ranges | cnn_cost: forward launch share | backward launch share |',
              '|---|---:|---:|---:|---:|']
        L += [f"| {t['setup']} | {fmt(t.get('gpu_busy_share_plain'))} | {fmt(t.get('gpu_busy_share'))} | {fmt(t.get('launch_share'))} | {fmt(t.get('bwd_launch_share'))} |"
              for t in truth if 'launch_share' in t]
        for t in truth:
            if 'rows' not in t: continue
            top = sorted(t['rows'], key=lambda x: -(x['ref_fwd_ms']+x['ref_bwd_ms']))[:12]
            L += ['', f"Costliest rows of {t['setup']} (ms); kernel time the reference charged to ops, over all kernels' time (1: each kernel once): "
                  f"{fmt(t.get('kernel_time_attributed'))}", '', '| row | type | cnn_cost fwd | profiler fwd | cnn_cost bwd | profiler bwd |', '|---|---|---:|---:|---:|---:|']
            L += [f"| {x['name']} | {x['type']} | {x['cc_fwd_ms']:.3f} | {x['ref_fwd_ms']:.3f} | {fmt(x['cc_bwd_ms'])} | {x['ref_bwd_ms']:.3f} |" for x in top]
        L += ['', 'Notes of each summary:', ''] + [f"- {t['setup']}: " + ' | '.join(t.get('notes', [])) for t in truth if t.get('notes')] + ['']
    m = R.get('memory')
    if isinstance(m, dict) and 'peaks' in m:
        L += ['### Memory', '', '| model | bs | dtype | predicted | max_memory_allocated | error | predict s |', '|---|---:|---|---:|---:|---:|---:|']
        L += [f"| {p['model']} | {p.get('bs','')} | {p.get('dtype','')} | {fmt(p.get('predicted'))} | {fmt(p.get('max_memory_allocated'))} | "
              f"{fmt(p.get('error'), True)} | {fmt(p.get('predict_s'))} |" for p in m['peaks']]
        L += ['', f"Largest batch: {m.get('batch')}", '', f"Checkpointing plan: {m.get('plan')}", '']
    for k in ('starved', 'memory', 'overhead', 'tests', 'tools'):
        if R.get(k) is not None and not (k=='memory' and 'peaks' in R[k]): L += [f'### {k}', '', '```', json.dumps(R[k], indent=1, default=str)[:3000], '```', '']
    L += [f"Seconds per part: {R.get('seconds')}"]
    return '\n'.join(L)

def write(R, out):
    "gpu_check.json, .md and .log as they stand"
    (out/'gpu_check.json').write_text(json.dumps(R, indent=1, default=str))
    try: (out/'gpu_check.md').write_text(markdown(R))
    except Exception: log(traceback.format_exc())
    (out/'gpu_check.log').write_text('\n'.join(LOG))

PARTS = dict(truth=part_truth, starved=part_starved, memory=part_memory, overhead=part_overhead, tests=part_tests, tools=part_tools)

def main():
    global A
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dry-run', action='store_true', help='run on the CPU at small sizes, skipping only what needs CUDA')
    ap.add_argument('--budget', type=float, default=420., help='seconds of wall time for all parts (the lease is 15 minutes, a start included)')
    ap.add_argument('--parts', default=','.join(PARTS), help=f'comma-separated, in order: {",".join(PARTS)}')
    ap.add_argument('--min-us', type=float, default=50.)
    ap.add_argument('--out', default=os.environ.get('OUT') or str(ROOT/'bench/out/gpu'))
    A = ap.parse_args()
    out = Path(A.out); out.mkdir(parents=True, exist_ok=True)
    if not A.dry_run and not torch.cuda.is_available(): sys.exit('No CUDA GPU here: run with --dry-run to try the command on the CPU')
    import fastai
    R = dict(device=torch.cuda.get_device_name(0) if not A.dry_run else f'CPU ({platform.machine()}, {torch.get_num_threads()} threads)',
             torch=torch.__version__, torchvision=torchvision.__version__, fastai=fastai.__version__, date=time.strftime('%Y-%m-%d %H:%M'),
             dry_run=A.dry_run, budget_s=A.budget)
    log(f"gpu_check on {R['device']}, torch {R['torch']}, fastai {R['fastai']}, budget {A.budget:.0f}s")
    tdir = out/'traces'; tdir.mkdir(exist_ok=True)
    for name in A.parts.split(','):
        if left()<20: log(f'== {name}: skipped, budget spent'); R[name] = dict(skipped='budget'); continue
        log(f'== {name}'); t = time.perf_counter()
        try: R[name] = PARTS[name](tdir if name=='truth' else out)
        except Exception: log(traceback.format_exc()); R[name] = dict(error=traceback.format_exc())
        R.setdefault('seconds', {})[name] = time.perf_counter()-t
        write(R, out)  # after every part: a run cut short keeps what it measured
    with tarfile.open(out/'traces.tar.gz', 'w:gz') as tf:  # the device tool brings back files of up to 16 MiB: the smallest traces first, until 12 MB
        for f in sorted(tdir.glob('*.json'), key=lambda f: f.stat().st_size):
            if (out/'traces.tar.gz').stat().st_size + f.stat().st_size/8 > 12e6: log(f'  trace {f.name} left out: too large to bring back'); continue
            tf.add(f, arcname=f.name)
    for f in tdir.glob('*.json'): f.unlink()
    tdir.rmdir()
    write(R, out)
    log(f'done in {time.perf_counter()-T0:.0f}s; files in {out}: {sorted(p.name for p in out.iterdir())}')

if __name__ == '__main__': main()
