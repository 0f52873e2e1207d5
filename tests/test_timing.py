"""Tests of `cnn_cost.timing`: kernel or launch time on a simulated GPU, a disturbed CPU detected, adaptive rounds."""
# --- Kernel time or launch time ---
# Which of the two a GPU's row times measure, kernel time or launch time: the whole path from the clock to the summaries' notes, on a simulated GPU
import numpy as np, pytest, torch, torch.nn as nn
import cnn_cost.learner, cnn_cost.callback
from fastai.vision.all import Learner, MSELossFlat, SGD
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from cnn_cost.all import *
from cnn_cost.timing import SimGPU, SimClock

class _Fn(torch.autograd.Function):
    "Identity whose backward launches a kernel of `ms` on `gpu`"
    @staticmethod
    def forward(ctx, x, gpu, ms): ctx.gpu,ctx.ms = gpu,ms; return x.clone()
    @staticmethod
    def backward(ctx, g): ctx.gpu.launch(ctx.ms, 0.05); return g, None, None

class SimLayer(nn.Module):
    "A layer that launches one kernel of `fwd_ms` in its forward and one of `bwd_ms` in its backward on a `SimGPU`, the host taking 0.05 ms for each"
    def __init__(self, gpu, fwd_ms, bwd_ms=None): super().__init__(); self.gpu,self.f,self.b = gpu,fwd_ms,fwd_ms*2 if bwd_ms is None else bwd_ms
    def forward(self, x): self.gpu.launch(self.f, 0.05); return _Fn.apply(x, self.gpu, self.b)

def sim_model(gpu, kernels): return nn.Sequential(nn.Linear(4, 4), *[SimLayer(gpu, k) for k in kernels])

@pytest.fixture
def gpu(monkeypatch):
    "A simulated GPU whose clock `model_cost` and `CostProfiler` use in place of the CPU's"
    g = SimGPU()
    for mod in (cnn_cost.learner, cnn_cost.callback): monkeypatch.setattr(mod, 'clock_for', lambda d: SimClock(g))
    return g

def test_model_cost_starved(gpu):
    s = model_cost(sim_model(gpu, [0.002]*4), torch.zeros(2, 4), n_repeat=3)
    sims = s.df[s.df.type=='SimLayer']
    np.testing.assert_allclose(sims.launch_ms, sims.time_ms)  # every stretch ended with the GPU waiting: all launch time
    assert s.launch_share > 0.9
    assert s.launch_bound and any(n.startswith('GPU waiting for the host in the forward') for n in s.notes)

def test_model_cost_ahead(gpu):
    s = model_cost(sim_model(gpu, [0.1, 2., 2., 0.5, 0.002]), torch.zeros(2, 4), n_repeat=3)
    sims = s.df[s.df.type=='SimLayer']
    np.testing.assert_allclose(sims.time_ms.iloc[1:], [2., 2., 0.5, 0.002], atol=1e-9)  # GPU time of each kernel
    # flagged: the Linear (a CPU op, nothing queued) and the first kernel's row, which began with nothing queued (it holds its launch: 0.05 ms)
    np.testing.assert_allclose(sims.launch_ms, [0.15, 0., 0., 0., 0.], atol=1e-9); assert s.launch_share < 0.05
    assert not s.launch_bound and any(n.startswith('GPU ahead of the host in the forward') for n in s.notes)

def test_model_cost_waits_inside_rows(gpu):
    "Rows that each end with a long kernel queued but launch for longer than the work queued before them: the GPU waited inside them (found in review)"
    class Many(nn.Module):
        def forward(self, x):
            for _ in range(50): gpu.launch(0.001, 0.02)
            gpu.launch(0.5); return x
    s = model_cost(nn.Sequential(*[Many() for _ in range(4)]), torch.zeros(1), n_repeat=3)
    assert s.launch_share > 0.99 and s.launch_bound and any(n.startswith('GPU waiting for the host in the forward') for n in s.notes)

def _learner(gpu, kernels):
    x = torch.randn(64, 4)
    ds = list(zip(x, x))
    dls = DataLoaders(DataLoader(ds, bs=8, drop_last=True), DataLoader(ds[:8], bs=8))
    return Learner(dls, sim_model(gpu, kernels), loss_func=MSELossFlat(), opt_func=SGD, lr=1e-3)

@pytest.mark.parametrize('kernels,starved', [([0.002]*3, True), ([0.1, 2., 2.], False)])
def test_cost_profiler(gpu, kernels, starved):
    learn = _learner(gpu, kernels)
    cp = CostProfiler(skip=1, n_batches=3)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, cbs=cp)
    s = cp.summary()
    sims = s.df[s.df.type=='SimLayer']
    assert len(sims)==3 and {'launch_ms', 'bwd_launch_ms'} <= set(s.df)
    if starved:
        np.testing.assert_allclose(sims.launch_ms, sims.time_ms); np.testing.assert_allclose(sims.bwd_launch_ms, sims.bwd_ms)
        assert s.launch_share > 0.5 and s.bwd_launch_share > 0.5
        assert s.launch_bound and {l.split(':')[0] for l in s._launch_lines()} == {'GPU waiting for the host in the forward', 'GPU waiting for the host in the backward'}
    else:  # only the first kernel's row began with nothing queued; the backward starts behind the forward's queued kernels
        assert (sims.launch_ms.iloc[1:]==0).all() and sims.launch_ms.iloc[0]>0 and (sims.bwd_launch_ms==0).all()
        np.testing.assert_allclose(sims.bwd_ms.iloc[1:], [4., 4.], atol=0.06)  # each layer's backward kernel
        assert not s.launch_bound and {l.split(':')[0] for l in s._launch_lines()} == {'GPU ahead of the host in the forward', 'GPU ahead of the host in the backward'}

def test_cpu_has_no_launch_time(seed_summary):
    "A CPU has no launch queue: no column, no line, and NaN shares; not 0"
    assert 'launch_ms' not in seed_summary.df and np.isnan(seed_summary.launch_share)
    assert not seed_summary.launch_bound and not seed_summary._launch_lines() and 'GPU may wait' not in seed_summary.facts()[-1]

def _busy_share(m, x):
    "GPU busy time / wall time of one plain forward of `m`, from `torch.profiler`'s kernel intervals (device activities only)"
    from torch.profiler import profile, ProfilerActivity
    from profiler_refs import kernel_busy_us
    import time
    with torch.no_grad():
        for _ in range(3): m(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            t = time.perf_counter(); m(x); torch.cuda.synchronize(); wall = (time.perf_counter()-t)*1e6
    return kernel_busy_us(p)/wall

@pytest.mark.cuda
def test_launch_bound_on_a_gpu():
    "On a real GPU: many tiny layers starve it and the summary says their times are launch time; a large matmul keeps it busy and the summary says kernel time; the profiler's busy share agrees"
    tiny = nn.Sequential(*[nn.Linear(8, 8) for _ in range(50)]).cuda(); xt = torch.randn(4, 8, device='cuda')
    big = nn.Sequential(*[nn.Sequential(nn.Linear(4096, 4096), nn.ReLU()) for _ in range(40)]).cuda(); xb = torch.randn(8192, 4096, device='cuda')
    st,sb = model_cost(tiny, xt, n_repeat=5),model_cost(big, xb, n_repeat=5)
    bt,bb = _busy_share(tiny, xt),_busy_share(big, xb)
    print(f"tiny: launch share {st.launch_share:.3f}, GPU busy {bt:.3f}; big: launch share {sb.launch_share:.3f}, GPU busy {bb:.3f}")
    assert bt < 0.5 and bb > 0.9  # the reference: the tiny model leaves the GPU idle most of the time, the big one does not
    assert st.launch_share > 0.8 and st.launch_bound and any(n.startswith('GPU waiting for the host in the forward') for n in st.notes)
    assert sb.launch_share < 0.05 and not sb.launch_bound and any(n.startswith('GPU ahead of the host in the forward') for n in sb.notes)
    assert (sb.df.launch_ms.iloc[1:]==0).all()  # every row after the first (which began after the synchronize, nothing queued) is GPU time for certain

def test_busy_needs_one_stream_and_a_margin():
    "Found in review: stamps on another stream do not time the pass's queue (a stretch across streams read -4.94 ms and 'busy'); launch jitter and clock drift need a margin"
    from cnn_cost.timing import CUDAClock, SimEvent, busy_margin_ms
    _Ev = lambda g, h, stream=0: SimEvent(g, h*1e6, h*1e6, stream)  # GPU ms, host ms (read as ns, before and after recording alike)
    c = CUDAClock.__new__(CUDAClock)
    c.pool = [_Ev(0., 0.)]
    a,b = _Ev(5., 0.01),_Ev(5.2, 0.05)           # 5 ms queued at `a`, the host reached `b` 0.04 ms later: busy
    assert c.busy(a, b)
    assert not c.busy(_Ev(5., 0.01, stream=7), b)  # the same readings with `a` on a side stream: not certified
    tight = _Ev(0.05+busy_margin_ms/2, 0.0)         # queued just beyond the host's time but within the margin: not certified
    assert not c.busy(tight, _Ev(1., 0.05))

# --- Timings a reader can trust ---
# A disturbed CPU is detected and said, adaptive rounds, shapes printed whole.
import os, sys, time, subprocess, contextlib, pytest, torch, torch.nn as nn
from cnn_cost.all import *
from cnn_cost.learner import n_min_repeat, n_paired
from cnn_cost.timing import CPUClock, cpu_wait_max, run_queue_ns
import cnn_cost.timing, cnn_cost.learner

linux = pytest.mark.skipif(run_queue_ns() is None or not hasattr(os, 'sched_setaffinity'), reason='needs /proc/self/task/*/schedstat and CPU affinity (Linux)')

def _cnn(): return nn.Sequential(nn.Conv2d(3,16,3,padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16,16,3,padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16,10))
X = torch.randn(8,3,32,32)

@contextlib.contextmanager
def one_core(n_busy=0):
    "This process and torch on one core (one thread), with `n_busy` processes spinning on that same core: a CPU the test controls"
    old,nt,core = os.sched_getaffinity(0),torch.get_num_threads(),max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core}); torch.set_num_threads(1)
    ps = [subprocess.Popen([sys.executable, '-c', f'import os,time\nos.sched_setaffinity(0,{{{core}}})\nt=time.time()\nwhile time.time()-t<60: pass'])
          for _ in range(n_busy)]
    try:
        if ps: time.sleep(0.3)  # the spinners are running
        yield core
    finally:
        for p in ps: p.kill(); p.wait()
        os.sched_setaffinity(0, old); torch.set_num_threads(nt)

def _core_ticks(core):
    "(busy, total) clock ticks of `core` so far (/proc/stat), and this process's own CPU ticks"
    f = next(l.split() for l in open('/proc/stat') if l.startswith(f'cpu{core} '))
    v = list(map(int, f[1:9])); own = os.times()
    return v[0]+v[1]+v[2]+v[5]+v[6]+v[7], sum(v), (own.user+own.system)*os.sysconf('SC_CLK_TCK')

@linux
def test_busy_cpu_flagged_quiet_one_not():
    "Processes competing for the core make the totals say the row times are disturbed, with the share; the same run alone waits less"
    with one_core() as core:
        a = _core_ticks(core); quiet = model_cost(_cnn(), X, n_repeat=10); b = _core_ticks(core)
    with one_core(n_busy=3): busy = model_cost(_cnn(), X, n_repeat=10)
    assert busy.cpu_wait > cpu_wait_max and busy.cpu_wait > quiet.cpu_wait
    assert busy.disturbed and any(f'waited {100*busy.cpu_wait:.0f}%' in n for n in busy.notes)
    assert quiet.disturbed == (quiet.cpu_wait > cpu_wait_max)
    others = (b[0]-a[0]-(b[2]-a[2]))/max(b[1]-a[1], 1)  # what other processes ran on the core during the quiet run
    if others > 0.02: pytest.skip(f"other processes used {100*others:.0f}% of the core during the quiet run: it was not quiet (busy run flagged as it should)")
    assert quiet.cpu_wait < cpu_wait_max and not quiet.disturbed

@linux
def test_busy_cpu_flagged_in_training():
    "`CostProfiler`: the same reading over each profiled batch"
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    x = torch.randn(64,3,32,32); y = (x.mean((1,2,3))>0).long()
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:16], bs=16, device='cpu')
    learn = Learner(dls, _cnn(), loss_func=nn.CrossEntropyLoss())
    with one_core(n_busy=3), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=CostProfiler(skip=1))
    s = learn.train_profile.summary()
    assert s.cpu_wait > cpu_wait_max and s.disturbed

def test_unavailable_off_linux(monkeypatch):
    "Without schedstat the totals say the check is unavailable: never quiet, never disturbed"
    monkeypatch.setattr(cnn_cost.timing, 'run_queue_ns', lambda: None)
    s = model_cost(_cnn(), X, n_repeat=2)
    assert s.cpu_wait != s.cpu_wait and not s.disturbed and any(n.startswith('CPU run-queue wait: unavailable') for n in s.notes)

class FakeClock(CPUClock):
    "A clock that moves 1 ms per stamp: every round times the same"
    def __init__(self): self.t = 0
    def stamp(self): self.t += 1_000_000; return self.t

def test_adaptive_rounds_stop_when_settled(monkeypatch):
    monkeypatch.setattr(cnn_cost.learner, 'clock_for', lambda dev: FakeClock())
    monkeypatch.setattr(cnn_cost.timing, 'run_queue_ns', lambda: None)  # the fake clock's rounds are quiet whatever the machine does
    s = model_cost(_cnn(), X)
    assert len(s.hooked_ms) == n_min_repeat and len(s.plain_ms) == n_paired   # identical rounds settle at once
    assert s.n_passes == 2 + n_min_repeat + n_paired   # counting, then the unhooked op pass (`plain_ops`, names only: the path is the same)
    assert s.hook_overhead == s.hooked_ms[0]/s.plain_ms[0]   # paired over the rounds that ran both
    assert (s.df.time_ms_se == 0).all() and s.precision == 0 and not s.loose

class Jitter(nn.Module):
    def __init__(self): super().__init__(); self.i = 0
    def forward(self, x): self.i += 1; time.sleep((0.002, 0.03, 0.06)[self.i%3]); return x   # 2, 30, 60 ms in turn (and more under load): never within 2.5%

def test_adaptive_rounds_capped(monkeypatch):
    monkeypatch.setattr(cnn_cost.timing, 'run_queue_ns', lambda: None)  # the precision lines are stated only for undisturbed passes: not at the mercy of the machine here
    s = model_cost(nn.Sequential(nn.Linear(4,4), Jitter()), torch.randn(2,4), max_repeat=7)
    assert len(s.hooked_ms) == 7 and len(s.plain_ms) == n_paired and s.n_passes == 2 + 7 + n_paired
    j = s.df.set_index('name').loc['1']   # the jittering row: its median known only roughly, and the totals name it
    assert j.time_ms_se > 0.05*j.time_ms and '1' in s.loose
    f = model_cost(nn.Sequential(nn.Linear(4,4), Jitter()), torch.randn(2,4), n_repeat=5, n_warmup=0)   # a fixed count, as before
    assert len(f.hooked_ms) == len(f.plain_ms) == 5 and f.n_passes == 2 + 10
    m = nn.Sequential(nn.Linear(2,2), nn.BatchNorm1d(2)).train(); w = m[0].weight.clone()
    for kw,msg in [(dict(n_repeat=0), 'n_repeat must be an int of at least 1'), (dict(n_repeat=1.5), 'n_repeat must be an int'),
                   (dict(max_repeat=0), 'max_repeat must be an int of at least 4'), (dict(n_warmup=-1), 'n_warmup must be an int of at least 0'),
                   (dict(precision=-1), 'precision is a relative standard error')]:
        with pytest.raises(ValueError, match=msg): model_cost(m, torch.randn(3,2), **kw)
        assert m.training and not any(x._forward_hooks or x._forward_pre_hooks for x in m.modules()) and torch.equal(m[0].weight, w)

def test_long_shapes_print_whole():
    "A video-sized output shape prints whole; the shape column widens to it, the rest keeps fastai's widths"
    s = model_cost(nn.Sequential(nn.Conv3d(1,1,1), nn.ReLU()), torch.randn(1,1,2,100,100), n_repeat=1)
    lines = str(s).splitlines()
    shape = '1 x 1 x 2 x 100 x 100'
    assert any(l.strip()==shape for l in lines), lines[:8]
    head = lines[2]
    assert head.index('Param #') - head.index('Output Shape') == len(shape)+1 and lines[4].index(shape) == head.index('Output Shape')
    assert len(lines[1]) == len(head) and set(lines[1]) == {'='}
