"""`CostProfiler` in a process of a distributed job: the time in collectives is charged to no row, on a one-rank gloo group in this process.
A collective made slow by a known sleep checks that its time leaves the row it ran in (forward and backward); DDP's wait after the last gradient;
the functions and hooks put back. The 2-rank runs against `torch.profiler`'s collective events are in `test_callback_ddp.py` (slow)"""
import time, threading, random, pytest, torch, torch.nn as nn, torch.distributed as dist
from fastai.vision.all import Learner, DataLoaders, Callback, set_seed
from cnn_cost.callback import CostProfiler
from cnn_cost.timing import CommWatch, collectives
from conftest import hook_count

SLEEP = 0.1  # s a slowed collective sleeps before running: far above what a loaded machine adds to a tiny layer's row

@pytest.fixture
def group():
    "A gloo process group of one rank in this process, destroyed after the test (later tests predict on a fake group of their own)"
    assert not dist.is_initialized()
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try: yield
    finally: dist.destroy_process_group()

@pytest.fixture
def slow_all_reduce(group, monkeypatch):
    "`dist.all_reduce` that sleeps `SLEEP` first: a collective whose time is known from below"
    f = dist.all_reduce
    def slow(*a, **k): time.sleep(SLEEP); return f(*a, **k)
    monkeypatch.setattr(dist, 'all_reduce', slow)
    return slow

def test_comm_watch(group):
    orig = {n: getattr(dist, n) for n in collectives if hasattr(dist, n)}
    t = torch.ones(4)
    with CommWatch() as w:
        dist.all_reduce(t); dist.all_reduce(t, async_op=True).wait(); dist.barrier()
        th = threading.Thread(target=lambda: dist.all_reduce(t)); th.start(); th.join()  # another thread's call: not this thread's time
    assert len(w.spans)==3 and w.n_async==1 and all(b>=a for a,b in w.spans)
    assert {n: getattr(dist, n) for n in orig}==orig
    with pytest.raises(RuntimeError), CommWatch(): raise RuntimeError('boom')
    assert {n: getattr(dist, n) for n in orig}==orig

class Reduce(nn.Module):
    "All-reduces its input in the forward (as `SyncBatchNorm` does) and its output's gradient in the backward, each once, after a sleep of its own"
    def __init__(self, own): super().__init__(); self.own = own
    def forward(self, x):
        time.sleep(self.own); dist.all_reduce(x.detach())
        return _RB.apply(x)
class _RB(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x.clone()
    @staticmethod
    def backward(ctx, g): dist.all_reduce(g); return g

def comm_learner(model, seed=0, n=96, bs=32):
    set_seed(seed, reproducible=True)
    x = torch.randn(n,3,8,8); y = (x.mean((1,2,3))>0).long()
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:bs], bs=bs, device='cpu')
    dls.train.rng = random.Random(seed)
    return Learner(dls, model, loss_func=nn.CrossEntropyLoss())

def test_collectives_in_no_row(slow_all_reduce):
    "A layer's forward and backward collectives leave its rows: each row keeps its own sleep, the step's comm columns hold the collectives"
    own = 0.01
    m = nn.Sequential(nn.Conv2d(3,4,3), Reduce(own), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4,2))
    learn = comm_learner(m)
    learn.fit(1, 1e-3, cbs=CostProfiler(skip=1, n_batches=2))
    s = learn.train_profile.summary()
    st,row = s.steps,s.df.set_index('name').loc['1']  # the layer that calls the collectives, forward and backward
    assert (st.comm_calls==2).all() and (st.comm_fwd>=1e3*SLEEP).all() and (st.comm_bwd>=1e3*SLEEP).all()
    assert (st.comm>=st.comm_fwd+st.comm_bwd-1e-9).all() and (st.comm_fwd<=st.forward).all() and (st.comm_bwd<=st.backward).all()
    assert 1e3*own <= row.time_ms < 1e3*SLEEP  # its own sleep, not the collective's
    assert row.bwd_ms < 1e3*SLEEP  # the backward collective is in no row either
    assert hook_count(m)==0 and dist.all_reduce is slow_all_reduce

def test_ddp_wait_after_last_gradient(group):
    "A model in `DistributedDataParallel`: from its last gradient to the backward's end (the all-reduce's wait) is collective time, and the hooks that find it go"
    set_seed(0)
    inner = nn.Sequential(nn.Conv2d(3,4,3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4,2))
    learn = comm_learner(nn.parallel.DistributedDataParallel(inner))
    learn.fit(1, 1e-3, cbs=CostProfiler(skip=1, n_batches=2))
    st = learn.train_profile.summary().steps
    assert (st.comm_bwd>0).all() and (st.comm_bwd<=st.backward).all()
    assert (st.comm_calls==1).all()  # DDP's broadcast of the BatchNorm's buffers in each forward
    assert all(not p._post_accumulate_grad_hooks for p in inner.parameters()) and hook_count(learn.model)==0

class Boom(nn.Module):
    def forward(self, x): raise RuntimeError('boom in the forward')

@pytest.mark.parametrize('where', ['forward', 'backward'])
def test_failed_fit_puts_torch_distributed_back(group, where):
    """A profiler attached to the learner (no `fit(cbs=...)` to remove it) and a fit that dies in a profiled batch: a forward that raises puts back
    `torch.distributed`'s functions and the gradient hooks at once; after a backward that raises, `remove()` (or the learner's next event) does"""
    orig = {n: getattr(dist, n) for n in collectives if hasattr(dist, n)}
    set_seed(0)
    inner = nn.Sequential(nn.Conv2d(3,4,3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4,2))
    learn = comm_learner(nn.parallel.DistributedDataParallel(inner), n=160)
    cp = CostProfiler(skip=1); learn.add_cb(cp)
    class Fail(Callback):
        def before_batch(self):
            if self.training and self.train_iter==3:
                if where=='forward': inner[1] = Boom()
                else: self.learn.loss_func = lambda p, y: _Fail.apply(p).sum()
    learn.add_cb(Fail())
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, 1e-3)
    same = lambda: {n: getattr(dist, n) for n in orig}==orig and all(not p._post_accumulate_grad_hooks for p in inner.parameters())
    assert same() == (where=='forward')
    cp.remove()
    assert same() and hook_count(learn.model)==0

class _Fail(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x.clone()
    @staticmethod
    def backward(ctx, g): raise RuntimeError('boom in the backward')

def test_rank_from_the_group(group, monkeypatch):
    "A group started with its rank and size (not `torch.distributed.run`'s variables): the table's rank is the group's"
    from cnn_cost.callback import _rank, _world
    monkeypatch.setenv('RANK', '3'); monkeypatch.setenv('WORLD_SIZE', '4')
    assert (_rank(), _world())==(0, 1)

def test_single_process_has_no_comm_columns():
    m = nn.Sequential(nn.Conv2d(3,4,3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4,2))
    learn = comm_learner(m)
    learn.fit(1, 1e-3, cbs=CostProfiler(skip=1, n_batches=2))
    s = learn.train_profile.summary()
    assert 'comm' not in s.steps and not any('ollective' in f for f in s.facts())
