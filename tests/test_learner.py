"Tests of `cnn_cost.learner` on compiled models: `torch.compile(model)`, `model.compile()` and a compiled `learn.model`, under `model_cost` and `CostProfiler`"
import math, random, numpy as np, pytest, torch, torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from torch._dynamo.utils import counters
from fastai.vision.all import *
from cnn_cost.all import *
from cnn_cost.core import LayerRecord, eager_module
from cnn_cost.summary import CostSummary
from cnn_cost.learner import is_compiled
from cnn_cost.callback import CostProfiler
from conftest import hook_count, heavy
for _n in [n for n in dir() if n.startswith('test')]: del globals()[_n]  # fastcore's test_* helpers, not tests

def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256,256), nn.ReLU(), nn.Linear(256,64))

def flops_macs(m, x, backward=False):
    "MACs of `m(x)` (and of its backward of `.sum()`) by `FlopCounterMode` on the eager module"
    with FlopCounterMode(display=False) as fc:
        if backward: m(x).sum().backward()
        else:
            with torch.no_grad(): m(x)
    return fc.get_total_flops()//2

def frames(): return dict(counters['frames']), counters['stats']['unique_graphs']

# model_cost
@pytest.mark.parametrize('how', ['wrapper', 'inplace'])
def test_model_cost_compiled(how):
    "Rows, names and MACs of the eager module; eager per-layer times, labelled; the compiled forward timed beside it; model left as it was"
    m,x = mlp(),torch.randn(32,256)
    sd = {k: v.clone() for k,v in m.state_dict().items()}
    if how=='wrapper': cm = torch.compile(m, backend='eager')
    else: cm = m; m.compile(backend='eager')
    cs = model_cost(cm, x, n_repeat=4)
    assert cs.df.name.tolist() == ['0', '1', '2', ''] and cs.model_name == 'Sequential'   # no `_orig_mod.`, no `OptimizedModule*` row
    assert cs.total_macs == flops_macs(m, x) == 32*256*(256+64)                           # independent reference and hand count
    leaves = cs.df[cs.df.kind=='leaf']
    assert (leaves.time_ms > 0).all()                       # eager passes: every hook fired
    assert cs.compiled and len(cs.compiled_ms) == len(cs.compiled_eager_ms) == 4 and all(t > 0 for t in cs.compiled_ms)
    assert math.isfinite(cs.compiled_speedup) and cs.compiled_first_ms > 0
    assert any(n.startswith('Compiled model') for n in cs.notes) and any(f.startswith('Compiled forward') for f in cs.facts())
    assert hook_count(cm) == 0 and all(o.training for o in m.modules())
    for k,v in m.state_dict().items(): assert torch.equal(v, sd[k])
    assert is_compiled(cm) and (how=='wrapper' or m._compiled_call_impl is not None)
    cm(x)                                                   # the compiled code still runs
    assert model_cost(cm, x, n_repeat=2).compiled_frames == 0   # warm for eval/no_grad: model_cost compiles nothing more

def test_model_cost_eager_model_not_marked():
    cs = model_cost(mlp(), torch.randn(4,256), n_repeat=2)
    assert not cs.compiled and not is_compiled(mlp()) and not any(f.startswith('Compiled') for f in cs.facts())

@pytest.mark.slow  # inductor compiles the forward with a C++ compiler; the `eager` and `aot_eager` backends stay in the default run
def test_model_cost_inductor():
    "The default backend (inductor + a C++ compiler) on CPU: a compiled forward measured, frames counted; rows as with `backend='eager'`"
    m,x = mlp(1),torch.randn(32,256)
    cs = model_cost(torch.compile(m), x, n_repeat=5)
    assert cs.compiled_frames >= 1 and cs.df.name.tolist() == ['0', '1', '2', ''] and cs.total_macs == flops_macs(m, x)
    assert all(t > 0 for t in cs.compiled_ms) and (cs.df.time_ms > 0).all()

def test_nested_compiled_submodule():
    "A compiled submodule is listed by what it wraps: `1.0`, not `1._orig_mod.0`; its layers timed in the eager passes"
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8,16), torch.compile(nn.Sequential(nn.ReLU(), nn.Linear(16,4)), backend='eager'))
    x = torch.randn(4,8)
    cs = model_cost(m, x, n_repeat=2)
    assert cs.df.name.tolist() == ['0', '1.0', '1.1', ''] and cs.total_macs == 4*(8*16+16*4) == flops_macs(nn.Sequential(m[0], eager_module(m[1])), x)
    assert cs.compiled and (cs.df.time_ms[cs.df.kind=='leaf'] > 0).all()

def test_not_timed_is_blank():
    "A row whose time was not measured is NaN: blank in the tables, out of the sums, named in the notes; all blank: total NaN, not 0"
    a = LayerRecord('0', 'Linear', calls=1, macs=10, macs_src='rule', times=[1.0, 3.0], shapes=[torch.Size([2,5])])
    b = LayerRecord('1', 'ReLU', calls=1, macs_src='ops', times=[np.nan, np.nan], shapes=[torch.Size([2,5])])
    cs = CostSummary([a, b], 'M', [torch.Size([2,4])], 'cpu', plain_ms=[2., 2.], hooked_ms=[2., 4.])
    assert cs.total_time_ms == 2.0 and np.isnan(cs.df.time_ms[1]) and np.isnan(cs.df.pct_time[1]) and cs.df.pct_time[0] == 100
    s = str(cs)
    assert 'nan' not in s and cs.not_timed == ['1']
    assert cs.display_df(fmt=True).time_ms.tolist() == ['2.000', '']
    b.times = []; a.times = []
    cs = CostSummary([a, b], 'M', [torch.Size([2,4])], 'cpu')
    assert np.isnan(cs.total_time_ms) and np.isnan(cs.stages().time_ms.iloc[0]) and 'nan' not in str(cs)

# CostProfiler
def tiny_learner(seed=0, n=192, bs=32, compile=None):
    set_seed(seed, reproducible=True)
    x = torch.randn(n,3,16,16); y = (x.mean((1,2,3))>0).long()
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:bs], bs=bs, device='cpu')
    dls.train.rng = random.Random(seed)
    m = nn.Sequential(nn.Conv2d(3,16,3,padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16,32,3,stride=2,padding=1),
                      nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32,2))
    if compile=='inplace': m.compile(backend='eager')
    elif compile: m = torch.compile(m, backend=compile)
    learn = Learner(dls, m, loss_func=nn.CrossEntropyLoss())
    learn.remove_cb(ProgressCallback); learn.logger = noop
    return learn

def compiled_fit(compile, cb=None):
    "Losses, dynamo's frame counts and unique graphs of one fit from a fresh dynamo cache"
    torch._dynamo.reset(); counters.clear()
    learn = tiny_learner(compile=compile)
    learn.fit(1, 1e-2, cbs=cb)
    return learn, torch.stack(learn.recorder.losses), *frames()

@pytest.mark.parametrize('compile', heavy(['eager', 'aot_eager', 'inplace'], ('aot_eager', 'inplace')))
def test_profiler_compiled_fit(compile):
    "No recompilation (the same frames and graphs as without the profiler), the same losses, the step split measured, rows of the eager model with blank times"
    _,la,fa,ga = compiled_fit(compile)
    if not fa.get('total'): pytest.skip(f"torch {torch.__version__}: `{compile}` compiled no frame in a plain fit (torch 2.11's in-place `Module.compile()`)")
    learn,lb,fb,gb = compiled_fit(compile, CostProfiler(skip=2, n_batches=3))
    assert (fb, gb) == (fa, ga) and fa['ok'] == fa['total'] and ga >= 1
    assert torch.equal(la, lb)
    s = learn.train_profile.summary()
    assert s.df.name.tolist()[:3] == ['0', '1', '2'] and s.model_name == 'Sequential' and hook_count(learn.model) == 0
    assert s.df.time_ms.isna().all() and s.df.bwd_ms.isna().all() and s.df.saved_bytes.isna().all()
    assert np.isnan(s.total_time_ms) and np.isnan(s.total_bwd_ms)
    assert len(s.steps) == 3 and (s.steps[['forward','loss','backward','optimizer','total']] > 0).all().all()
    assert 'nan' not in str(s) and any(n.startswith('Compiled model') for n in s.notes) and not any(n.startswith('Rows sum to') for n in s.notes)
    # MACs: the eager reference, forward and backward of the same training step
    ref = tiny_learner(); ref.fit(1, 1e-2, cbs=CostProfiler(skip=2, n_batches=1))
    r = ref.train_profile.summary()
    assert s.total_macs == r.total_macs and s.df.bwd_macs.sum() == r.df.bwd_macs.sum()
    xb = learn.dls.train.one_batch()[0]
    assert s.total_macs == flops_macs(eager_module(learn.model).eval(), xb)

def test_profiler_compile_in_profiled_batch_noted():
    "skip=1: batch 0 is counted eagerly, batch 1 compiles while profiled: the summary says which step times include compilation"
    learn,_,f,g = compiled_fit('eager', CostProfiler(skip=1, n_batches=3))
    _,_,f0,g0 = compiled_fit('eager')
    assert (f, g) == (f0, g0)
    s = learn.train_profile.summary()
    assert learn.train_profile.compiled_frames[0] >= 1 and not any(learn.train_profile.compiled_frames[1:])
    assert any('during 1 of the 3 profiled batches' in n for n in s.notes)

@pytest.mark.slow  # about 35 s on 2 busy cores: inductor compiles forward and backward
def test_profiler_compiled_fit_inductor():
    "The default backend, forward and backward compiled by inductor: no recompilation with the profiler, step split measured"
    torch._dynamo.reset(); counters.clear()
    l0 = tiny_learner(); l0.model = torch.compile(l0.model)
    l0.fit(1, 1e-2); fa = frames()
    torch._dynamo.reset(); counters.clear()
    l1 = tiny_learner(); l1.model = torch.compile(l1.model)
    l1.fit(1, 1e-2, cbs=CostProfiler(skip=2, n_batches=3)); fb = frames()
    assert fa == fb
    s = l1.train_profile.summary()
    assert s.df.time_ms.isna().all() and (s.steps.forward > 0).all() and s.df.name.iloc[0] == '0'

def test_learner_cost_summary_and_plot_compiled():
    "`learn.cost_summary()` of a compiled `learn.model`: eager rows beside the compiled forward; a compiled fit's plot draws with blank times"
    learn = tiny_learner(compile='eager')
    cs = learn.cost_summary(n_repeat=2)
    assert cs.compiled and cs.model_name == 'Sequential' and cs.df.name.iloc[0] == '0' and (cs.df.time_ms > 0).all()
    learn.fit(1, 1e-2, cbs=CostProfiler(skip=2, n_batches=2))
    fig = learn.train_profile.plot(k=5)
    assert fig is not None and learn.train_profile.compiled_frames is not None

def test_compiled_defaults():
    "Every public entry point with its defaults on a compiled model (the adaptive `n_repeat=None` included): `model_cost`, `learn.cost_summary()`"
    m,x = mlp(2),torch.randn(32,256)
    cm = torch.compile(m, backend='eager')
    for _ in range(2): cm(x)                                # warm, as the user who found the crash had it
    sd = {k: v.clone() for k,v in m.state_dict().items()}
    cs = model_cost(cm, x)
    assert cs.compiled and len(cs.compiled_ms) == len(cs.compiled_eager_ms) >= len(cs.hooked_ms) and all(t > 0 for t in cs.compiled_ms)
    assert math.isfinite(cs.compiled_speedup) and cs.total_macs == flops_macs(m, x)
    assert hook_count(cm) == 0 and all(o.training for o in m.modules())
    for k,v in m.state_dict().items(): assert torch.equal(v, sd[k])
    for how in ['eager', 'inplace']:
        learn = tiny_learner(compile=how)
        cs = learn.cost_summary()
        assert cs.compiled and len(cs.compiled_ms) >= 4 and cs.df.name.iloc[0] == '0' and (cs.df.time_ms > 0).all()
        assert hook_count(learn.model) == 0
