"The per-layer reference the GPU check compares cnn_cost's times with (tests/profiler_refs.py), checked on the CPU: every op charged once, to the module a hand count gives"
import subprocess, sys, json
from pathlib import Path
import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from torch.utils.checkpoint import checkpoint
from collections import defaultdict
from profiler_refs import range_hooks, attribute, _own_us, _node, RefProfiler, median_split
from cnn_cost.all import *
from conftest import new_seed_learner

class Block(nn.Module):
    "A residual block: the add and the scale are the parent's own ops"
    def __init__(self, ck=False): super().__init__(); self.c,self.r,self.ck = nn.Conv2d(8, 8, 3, padding=1),nn.ReLU(),ck
    def forward(self, x):
        f = (lambda x: self.r(self.c(x)))
        return x + 2*(checkpoint(f, x, use_reentrant=False) if self.ck else f(x))

def _model(ck=False): return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Block(ck), nn.Flatten(), nn.Linear(8*8*8, 4))

def _profiled(m, steps=2):
    torch.manual_seed(0)
    x,y = torch.randn(4, 3, 8, 8),torch.randint(0, 4, (4,))
    hs = range_hooks(m)
    try:
        for _ in range(steps): F.cross_entropy(m(x), y).backward()  # gradients exist: AccumulateGrad adds into them, as in training
        with profile(activities=[ProfilerActivity.CPU]) as p: F.cross_entropy(m(x), y).backward()
    finally:
        for h in hs: h.remove()
    return p.events()

def test_every_op_charged_once():
    evs = _profiled(_model())
    r = attribute(evs)
    tot = sum(_own_us(e, 'cpu') for e in evs)
    np.testing.assert_allclose(sum(r['fwd'].values()) + sum(r['bwd'].values()) + r['loss'] + r['outside'], tot, rtol=1e-9)
    assert set(r['fwd']) == {'0', '1', '1.c', '1.r', '2', '3'}  # '1': the block's add and scale; the root, a Sequential, runs no op of its own
    assert set(r['bwd']) >= {'0', '1', '1.c', '1.r', '3'} and r['loss'] > 0 and not r['recompute']

def test_backward_nodes_go_to_their_module():
    "A node is charged where its forward op ran: the parent's add and scale to the block, the conv's to the conv, AccumulateGrad after its node"
    evs = _profiled(_model())
    node = 'autograd::engine::evaluate_function: '
    tops = [e for e in evs if e.name.startswith(node) and e.cpu_parent is None]
    names = [e.name[len(node):] for e in tops]
    assert 'MulBackward0' in names and 'AddBackward0' in names and 'ConvolutionBackward0' in names
    r = attribute(evs)
    own = lambda pred: sum(_own_us(c, 'cpu') for e in tops if pred(e.name[len(node):]) for c in [e, *_desc(e)])
    conv_b = own(lambda n: n=='ConvolutionBackward0')
    acc = own(lambda n: 'AccumulateGrad' in n)
    assert acc > 0
    # both convolutions' and the linear's nodes and their parameters' AccumulateGrad: all of the model's backward but the block's own add and scale
    np.testing.assert_allclose(r['bwd']['0'] + r['bwd']['1.c'] + r['bwd']['3'] + r['bwd']['2'] + r['bwd']['1.r'] + r['bwd']['1'],
                               sum(r['bwd'].values()), rtol=1e-9)
    assert r['bwd']['1'] >= own(lambda n: n in ('MulBackward0', 'AddBackward0')) - 1e-9
    assert r['bwd']['0'] + r['bwd']['1.c'] >= conv_b

def _desc(e):
    for c in e.cpu_children: yield c; yield from _desc(c)

def test_recompute_is_backward_work():
    "Under activation checkpointing the block's forward runs again inside the backward: that is the block's backward, not a second forward"
    plain,ck = attribute(_profiled(_model())),attribute(_profiled(_model(ck=True)))
    # torch stops the recompute as soon as it has the last saved tensor, inside ReLU, before its range closes: the conv is recomputed work, the ReLU's
    # op goes to its node's module, as cnn_cost's hooks charge it (only up to the recompute's last hook is it recompute)
    assert set(ck['recompute']) == {'1.c'} and ck['recompute']['1.c'] > 0
    assert ck['bwd']['1.c'] > ck['recompute']['1.c']  # the conv's backward holds its recompute and its gradient
    assert '1.c' in ck['fwd'] and not plain['recompute']

# A second method for the backward split: sequence-number markers. A marker (a clone of a fresh leaf, which makes one node) in every module's pre-
# and post-hook reads the thread's autograd sequence counter, so each module call holds an interval of numbers; a node belongs to the innermost
# module whose interval holds its number. It runs on a second step, matched to the first node by node.
def _mark():
    with torch.enable_grad(): return torch.zeros(1, requires_grad=True).clone().grad_fn._sequence_nr()

def _marker_split(model, loss, steps=2):
    "{module: µs} of each top-level backward node (own time and its descendants') by the marker method, and the reference's split of the same step"
    log,hs = [],range_hooks(model)
    try:
        for _ in range(steps): loss(model).backward()
        with profile(activities=[ProfilerActivity.CPU]) as p: loss(model).backward()
        for n,m in model.named_modules():
            hs += [m.register_forward_pre_hook(lambda m, a, n=n: log.append(('in', n, _mark()))),
                   m.register_forward_hook(lambda m, a, o, n=n: log.append(('out', n, _mark())))]
        with profile(activities=[ProfilerActivity.CPU]) as q: loss(model).backward()
    finally:
        for h in hs: h.remove()
    ivs,st = [],[]
    for k,n,sq in log:
        if k=='in': st.append((n, sq))
        elif st and st[-1][0]==n: n0,s0 = st.pop(); ivs.append((s0, sq, n0, len(st)))
    owner = lambda sq: max([(d, n) for a,b,n,d in ivs if a<sq<b], default=(0, None))[1]
    tops = lambda evs: [e for e in sorted(evs, key=lambda e: e.time_range.start) if e.name.startswith(_node) and e.cpu_parent is None]
    a,b = tops(p.events()),tops(q.events())
    assert [e.name for e in a]==[e.name for e in b]
    res,last = defaultdict(float),None
    for e,f in zip(a, b):
        acc = 'AccumulateGrad' in e.name
        m = last if acc else owner(f.sequence_nr) if f.sequence_nr>=0 else None
        if not acc: last = m
        res['loss' if m is None else m] += sum(_own_us(c, 'cpu') for c in [e, *_desc(e)])
    return res,attribute(p.events())

class ArgOut(nn.Module):
    "Ends with an op that makes no node (`argmax`): it carries the number the next module's first node takes"
    def __init__(self): super().__init__(); self.l = nn.Linear(8, 8)
    def forward(self, x): y = self.l(x); self.idx = y.argmax(1); return y
class Shared(nn.Module):
    "One module called twice, and a module's `forward` called directly (its ops are the caller's)"
    def __init__(self): super().__init__(); self.a,self.b = nn.Linear(8, 8),nn.Linear(8, 4)
    def forward(self, x): return self.b.forward(torch.relu(self.a(self.a(x))))
class LSTMNet(nn.Module):
    def __init__(self): super().__init__(); self.lstm,self.head = nn.LSTM(8, 8, batch_first=True),nn.Linear(8, 4)
    def forward(self, x): return self.head(self.lstm(x[:, None].repeat(1, 5, 1))[0][:, -1])
class MHANet(nn.Module):
    def __init__(self): super().__init__(); self.mha,self.head = nn.MultiheadAttention(8, 2, batch_first=True),nn.Linear(8, 4)
    def forward(self, x): s = x[:, None].repeat(1, 3, 1); return self.head(self.mha(s, s, s)[0].mean(1))
class Inplace(nn.Module):
    def __init__(self): super().__init__(); self.c,self.r,self.head = nn.Conv1d(1, 2, 3, padding=1),nn.ReLU(inplace=True),nn.Linear(16, 4)
    def forward(self, x): y = self.c(x[:, None]); y.mul_(2); return self.head(self.r(y).flatten(1))
class LossInside(nn.Module):
    def __init__(self): super().__init__(); self.l,self.crit = nn.Linear(8, 4),nn.CrossEntropyLoss()
    def forward(self, x, y): return self.crit(self.l(x), y)
class GAN(nn.Module):
    "Two models in one step, the critic run on a detached and a live generator output"
    def __init__(self): super().__init__(); self.G,self.D = nn.Sequential(nn.Linear(8, 8), nn.Tanh()),nn.Sequential(nn.Linear(8, 1))
    def forward(self, z): f = self.G(z); return self.D(f.detach()).mean() - self.D(f).mean()

_X,_Y = torch.randn(4, 8),torch.randint(0, 4, (4,))
_ce = lambda m: F.cross_entropy(m(_X), _Y)
@pytest.mark.parametrize('make,loss', [(lambda: nn.Sequential(ArgOut(), nn.Linear(8, 4)), _ce), (Shared, _ce), (LSTMNet, _ce), (MHANet, _ce),
                                       (Inplace, _ce), (LossInside, lambda m: m(_X, _Y)), (GAN, lambda m: m(_X))],
                         ids=['argmax', 'shared', 'lstm', 'mha', 'inplace', 'loss_inside', 'gan'])
def test_nodes_match_sequence_markers(make, loss):
    "Each backward node is charged to the module the marker method gives (found in review: the first op carrying a number is not always its node's maker)"
    torch.manual_seed(0)
    exp,r = _marker_split(make(), loss)
    got = dict(r['bwd'], loss=r['loss'])
    assert set(k for k,v in got.items() if v) == set(k for k,v in exp.items() if v)
    for k in exp: np.testing.assert_allclose(got.get(k, 0.), exp[k], rtol=1e-9, atol=1e-6, err_msg=k)

def test_reentrant_checkpoint():
    "A reentrant checkpoint's nested backward is the inner modules' work, as cnn_cost's hooks charge it, not the caller's"
    class Ck(nn.Module):
        def __init__(self): super().__init__(); self.inner,self.head = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 8)),nn.Linear(8, 4)
        def forward(self, x): return self.head(checkpoint(self.inner, x, use_reentrant=True))
    torch.manual_seed(0)
    m,x = Ck(),_X.clone().requires_grad_()
    hs = range_hooks(m)
    try:
        for _ in range(2): F.cross_entropy(m(x), _Y).backward()
        with profile(activities=[ProfilerActivity.CPU]) as p: F.cross_entropy(m(x), _Y).backward()
    finally:
        for h in hs: h.remove()
    r = attribute(p.events())
    for n in ('inner.0', 'inner.2'): assert r['bwd'][n] > r['recompute'][n] > 0  # recomputed, and their gradients computed, inside the caller's node
    assert not any('_cc_rf' in vars(mod) for mod in m.modules())  # no range left on the modules

@pytest.mark.slow  # profiles a fit with torch.profiler beside CostProfiler
def test_ref_profiler_beside_cost_profiler():
    "On fastai training batches, the reference charges backward time to the same layers cnn_cost's rows time, and both cover the whole backward"
    learn = new_seed_learner()
    cp,rp = CostProfiler(skip=2, every=2, n_batches=2),RefProfiler(start=3, every=2, n_batches=2)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, cbs=[cp, rp])
    s = cp.summary()
    assert len(rp.results)==2 and [r['iter'] for r in rp.results]==[3, 5] and [b['iter'] for b in cp.batches]==[2, 4]
    bwd = median_split(rp.results, 'bwd')
    timed = set(s.df.name[s.df.bwd_ms>0])
    big = {n for n,v in bwd.items() if v>=50}
    assert big and big <= timed | set(s.df.name[s.df.kind=='own'])  # every layer with real backward work in the reference has a timed row
    assert all(n in set(s.df.name) for n in bwd)                     # and the reference finds no module the rows miss

@pytest.mark.slow  # the whole GPU command on the CPU, about a minute
def test_gpu_check_dry_run(tmp_path):
    "The GPU check's command runs on the CPU (`--dry-run`) through every part that needs no GPU, and writes its tables"
    root = Path(__file__).parent.parent
    r = subprocess.run([sys.executable, str(root/'bench/gpu_check.py'), '--dry-run', '--parts', 'truth,starved,memory,overhead,tools', '--out', str(tmp_path),
                        '--budget', '3000'],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode==0, r.stdout[-3000:]+r.stderr[-3000:]
    R = json.loads((tmp_path/'gpu_check.json').read_text())
    assert R['dry_run'] and not [k for k in ('truth', 'starved', 'memory', 'overhead', 'tools') if 'error' in R[k]]
    truth = [t for t in R['truth'] if 'stats' in t]
    assert len(truth)==2 and all(t['stats']['bwd']['ref_covered'] > 0.99 and t['stats']['fwd']['ref_covered'] > 0.99 for t in truth)
    assert not [t for t in R['truth'] if 'error' in t] and R['memory']['peaks'][0]['predicted'] > 0 and R['memory']['plan']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['gpu_check.json', 'gpu_check.log', 'gpu_check.md', 'traces.tar.gz']
