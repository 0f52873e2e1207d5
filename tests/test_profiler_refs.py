"The per-layer reference the GPU check compares cnn_cost's times with (tests/profiler_refs.py), checked on the CPU: every op charged once, to the module a hand count gives"
import subprocess, sys, json
from pathlib import Path
import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from torch.utils.checkpoint import checkpoint
from profiler_refs import range_hooks, attribute, _own_us, RefProfiler, median_split
from cnn_cost.all import *

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

def test_ref_profiler_beside_cost_profiler():
    "On fastai training batches, the reference charges backward time to the same layers cnn_cost's rows time, and both cover the whole backward"
    from fastai.vision.all import vision_learner, resnet18
    torch.manual_seed(0)
    learn = vision_learner(digits_dls(), resnet18, pretrained=False, n_out=10)
    cp,rp = CostProfiler(skip=2, every=2, n_batches=2),RefProfiler(start=3, every=2, n_batches=2)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, cbs=[cp, rp])
    s = cp.summary()
    assert len(rp.results)==2 and [r['iter'] for r in rp.results]==[3, 5] and [b['iter'] for b in cp.batches]==[2, 4]
    bwd = median_split(rp.results, 'bwd')
    timed = set(s.df.name[s.df.bwd_ms>0])
    big = {n for n,v in bwd.items() if v>=50}
    assert big and big <= timed | set(s.df.name[s.df.kind=='own'])  # every layer with real backward work in the reference has a timed row
    assert all(n in set(s.df.name) for n in bwd)                     # and the reference finds no module the rows miss

def test_gpu_check_dry_run(tmp_path):
    "The GPU check's command runs on the CPU (`--dry-run`) through every part that needs no GPU, and writes its tables"
    root = Path(__file__).parent.parent
    r = subprocess.run([sys.executable, str(root/'bench/gpu_check.py'), '--dry-run', '--parts', 'truth,starved,memory,overhead,tools', '--out', str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode==0, r.stdout[-3000:]+r.stderr[-3000:]
    R = json.loads((tmp_path/'gpu_check.json').read_text())
    assert R['dry_run'] and not [k for k in ('truth', 'starved', 'memory', 'overhead', 'tools') if 'error' in R[k]]
    truth = [t for t in R['truth'] if 'stats' in t]
    assert len(truth)==2 and all(t['stats']['bwd']['ref_covered'] > 0.99 and t['stats']['fwd']['ref_covered'] > 0.99 for t in truth)
    assert not [t for t in R['truth'] if 'error' in t] and R['memory']['peaks'][0]['predicted'] > 0 and R['memory']['plan']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['gpu_check.json', 'gpu_check.log', 'gpu_check.md', 'traces.tar.gz']
