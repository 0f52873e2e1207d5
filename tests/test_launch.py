"Which of the two a GPU's row times measure, kernel time or launch time: the whole path from the clock to the summaries' notes, on a simulated GPU"
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
