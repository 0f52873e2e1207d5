"""One test per execution mode that `CostProfiler` meets in `fit`: plain, activation checkpointing (reentrant, non-reentrant, `checkpoint_sequential`,
torchvision `memory_efficient`, timm `set_grad_checkpointing`), batches that run different modules, and fastai's `GANLearner`.
MACs are checked per phase against `torch.utils.flop_counter.FlopCounterMode` on the same step; times only by relations that cannot fail on a busy machine
(the rows of a batch lie inside its measured forward and backward)."""
import random, warnings, pytest, torch, torch.nn as nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential
from torch.utils.flop_counter import FlopCounterMode
from fastai.vision.all import *
from cnn_cost.callback import CostProfiler
for _n in [n for n in dir() if n.startswith('test')]: del globals()[_n]  # fastcore's test_* helpers, not tests

def macs(f):
    "MACs `FlopCounterMode` counts while `f()` runs, and what `f` returns"
    with FlopCounterMode(display=False) as fc: res = f()
    return fc.get_total_flops()//2, res

def step_macs(model, xb, loss=lambda o: o.sum()):
    "FlopCounterMode's forward and backward MACs of one training step of `model` on `xb` (gradients then cleared)"
    f,out = macs(lambda: loss(model(xb)))
    b,_ = macs(lambda: out.backward())
    model.zero_grad(); return f,b

def learner(model, xs, bs, loss=lambda o,y: o.sum(), **kw):
    "A `Learner` on the in-memory inputs `xs` (targets unused by `loss`)"
    ys = torch.zeros(len(xs))
    dls = DataLoaders.from_dsets(list(zip(xs,ys)), list(zip(xs,ys))[:bs], bs=bs, device='cpu', shuffle=False)
    return Learner(dls, model, loss_func=loss, **kw)

def rows_inside_step(cp, pattern=None):
    "Every profiled batch (of `pattern`): its rows' forward ms lie inside its forward (and loss, when modules ran there), its rows' backward ms inside its backward"
    for t in cp.tables:
        pats = t.get('patterns') or [0]*len(t['fwd'])
        for f,b,st,p,il in zip(t['fwd'], t['bwd'], t['steps'], pats, t['in_loss']):
            if pattern is not None and p!=pattern: continue
            assert sum(f) <= st['forward'] + (st['loss'] if il else 0) + 1e-6, (sum(f), st)
            assert sum(b) <= st['backward'] + 1e-6, (sum(b), st)

def check_counts(s, f, b):
    "The summary's forward and backward MACs equal FlopCounterMode's `f`, `b`"
    assert (s.df.macs.sum(), s.df.bwd_macs.sum()) == (f, b)

def fit_profiled(learn, n_batches=3, skip=1):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, 1e-3, cbs=CostProfiler(skip=skip, n_batches=n_batches))
    return learn.train_profile

def test_plain():
    "A plain MLP: one pattern, rows = FlopCounterMode per phase, one call each"
    set_seed(0)
    m = nn.Sequential(nn.Linear(64,64), nn.ReLU(), nn.Linear(64,8))
    xs = torch.randn(64,64)
    f,b = step_macs(m, xs[:16])
    cp = fit_profiled(learner(m, xs, 16))
    s = cp.summary()
    check_counts(s, f, b)
    assert len(cp.patterns)==1 and list(s.df.calls)==[1]*len(s.df) and not s.uncalled
    assert 'recompute_ms' not in s.df and s.df.recompute_macs.sum()==0
    rows_inside_step(cp)

def test_to_fp16_on_cpu():
    "`to_fp16()` on a CPU learner: fastai's `MixedPrecision` autocasts on CUDA only, so the batches run in float32, and the summary says so"
    set_seed(0)
    m = nn.Sequential(nn.Linear(64,64), nn.ReLU(), nn.Linear(64,8))
    xs = torch.randn(64,64)
    f,b = step_macs(m, xs[:16])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch warns that CUDA autocast is off without a GPU
        s = fit_profiled(learner(m, xs, 16).to_fp16()).summary()
    check_counts(s, f, b)
    assert list(s.df.act_bytes[:3]) == [16*64*4, 16*64*4, 16*8*4]   # float32 activations: 4 bytes each (the model's own row: none)
    assert any('`to_fp16()` has no effect on cpu' in n and 'float32' in n for n in s.notes)
    assert not any('has no effect' in n for n in fit_profiled(learner(m, xs, 16)).summary().notes)

class Ckpt(nn.Module):
    "Checkpointing inside `forward`: `checkpoint(body, stem(x))`"
    def __init__(self, reentrant): super().__init__(); self.stem,self.body,self.reentrant = nn.Linear(64,64),nn.Sequential(nn.Linear(64,64), nn.ReLU()),reentrant
    def forward(self, x): return checkpoint(self.body, self.stem(x), use_reentrant=self.reentrant)

@pytest.mark.parametrize('reentrant', [False, True])
def test_checkpoint(reentrant):
    "Forward counted once; the recompute is backward work, shown apart; every layer's backward attributed; saved bytes what the forward keeps"
    set_seed(0)
    m,xs = Ckpt(reentrant),torch.randn(64,64)
    f,b = step_macs(m, xs[:16])
    assert (f,b) == (131_072, 262_144)
    cp = fit_profiled(learner(m, xs, 16))
    s = cp.summary(); df = s.df.set_index('name')
    check_counts(s, f, b)
    assert list(df.calls) == [1,1,1,1]
    assert list(df.loc[['stem','body.0'], 'bwd_macs']) == [65_536, 196_608] and list(df.loc[['stem','body.0'], 'bwd_src']) == ['ops','ops']
    assert df.loc['body.0','recompute_macs'] == 65_536 and df.loc['stem','recompute_macs'] == 0
    assert df.loc['body.0','recompute_ms'] > 0 and df.loc['stem','recompute_ms'] == 0
    assert (df.loc[['stem','body.0'], 'bwd_ms'] > 0).all()
    assert df.loc['body.0','bwd_ms'] >= df.loc['body.0','recompute_ms']
    # the forward keeps the stem's input (the batch, no layer's) and the checkpoint's input (the stem's output), nothing inside the region
    assert list(df.saved_bytes) == [0, 0, 0, 16*64*4]  # the stem's input is the batch: held anyway, in no row
    assert any('recomputed 65.5k MACs' in n for n in s.notes)
    rows_inside_step(cp)

def test_checkpoint_sequential():
    set_seed(0)
    class CS(nn.Module):
        def __init__(self): super().__init__(); self.mlp = nn.Sequential(*[nn.Sequential(nn.Linear(32,32), nn.ReLU()) for _ in range(4)])
        def forward(self, x): return checkpoint_sequential(self.mlp, 2, x, use_reentrant=False)
    m,xs = CS(),torch.randn(64,32)
    f,b = step_macs(m, xs[:16])
    cp = fit_profiled(learner(m, xs, 16))
    s = cp.summary()
    check_counts(s, f, b)
    lin = s.df[s.df.type=='Linear']
    assert list(lin.calls) == [1]*4 and list(lin.recompute_macs) == [16*32*32]*2 + [0]*2  # the last segment is not checkpointed
    rows_inside_step(cp)

@pytest.mark.slow  # a torchvision DenseNet trained with its own checkpointing; test_pairs_compose keeps a checkpointed fit in the default set
def test_densenet_memory_efficient():
    "torchvision's checkpointed dense layers (a recompute torch stops early, before conv1 computes): counts per phase and rows inside the step"
    from torchvision.models import densenet121
    set_seed(0)
    m,xs = densenet121(num_classes=2, memory_efficient=True),torch.randn(4,3,32,32)
    f,b = step_macs(m, xs[:2])
    cp = fit_profiled(learner(m, xs, 2), n_batches=1)
    s = cp.summary()
    check_counts(s, f, b)
    conv1 = s.df[s.df.name.str.endswith('.conv1') & s.df.name.str.contains('denselayer')]
    assert len(conv1)==58 and (conv1.calls==1).all()
    # the recompute runs norm1 and relu1 again and stops once conv1 has saved its input, before conv1 computes: no recompute MACs
    assert s.df.recompute_macs.sum() == 0 and s.df.recompute_elem_ops.sum() > 0
    rec = s.df[s.df.recompute_elem_ops>0]
    assert set(rec.type) == {'BatchNorm2d','ReLU'} and len(rec) == 2*58 and (rec.recompute_ms > 0).all()
    rows_inside_step(cp)

def test_timm_grad_checkpointing():
    timm = pytest.importorskip('timm')
    set_seed(0)
    m = timm.create_model('resnet18', pretrained=False, num_classes=2)
    m.set_grad_checkpointing(True)
    xs = torch.randn(4,3,32,32)
    f,b = step_macs(m, xs[:2])
    cp = fit_profiled(learner(m, xs, 2), n_batches=1)
    s = cp.summary()
    check_counts(s, f, b)
    assert (s.df[s.df.type=='Conv2d'].calls==1).all() and s.df.recompute_macs.sum() > 0
    rows_inside_step(cp)

class Alt(nn.Module):
    "`a(x)` on even batches, `b(b(x))` on odd ones (`Flip` switches it, as fastai's GAN switchers do)"
    def __init__(self): super().__init__(); self.a,self.b,self.odd = nn.Linear(32,32),nn.Linear(32,32),False
    def forward(self, x): return self.b(self.b(x)) if self.odd else self.a(x)
class Flip(Callback):
    def after_batch(self): self.learn.model.odd = not self.learn.model.odd

def test_alternating_modules():
    "Each set of modules that ran is counted; 'never called' only for what never ran; a module's time from the batches that ran it"
    set_seed(0)
    learn = learner(Alt(), torch.randn(256,32), 16, cbs=Flip())
    cp = fit_profiled(learn, n_batches=8, skip=2)
    assert len(cp.patterns)==2 and all(p['recs'] is not None for p in cp.patterns)
    s = cp.summary(); df = s.df.set_index('name')
    assert not s.uncalled and list(df.loc[['a','b'], 'calls']) == [1, 2]
    n = 16*32*32
    by = {p['key'][1][:2]: i for i,p in enumerate(cp.patterns)}  # (calls of a, calls of b) -> pattern
    sa,sb = cp.summary(by[(1,0)]),cp.summary(by[(0,2)])
    assert (sa.df.macs.sum(), sa.df.bwd_macs.sum()) == (n, n)        # a's input needs no gradient: weight gradient only
    assert (sb.df.macs.sum(), sb.df.bwd_macs.sum()) == (2*n, 3*n)    # the second b call also computes its input's gradient
    assert list(sa.uncalled)==['b'] and list(sb.uncalled)==['a']
    # a's median is over the batches that ran a: no zero from b's batches
    t = cp.tables[0]; j = t['names'].index('a')
    a_ms = [f[j] for f,p in zip(t['fwd'], t['patterns']) if p==by[(1,0)]]
    assert len(a_ms)==4 and df.loc['a','time_ms'] == pytest.approx(float(np.median(a_ms)))
    assert any('2 different patterns' in x for x in s.notes)
    for p in range(2): rows_inside_step(cp, p)

def test_gan():
    "fastai's `GANLearner.wgan`: generator and critic steps counted and reported apart, each equal to FlopCounterMode on the same step"
    from fastai.vision.gan import GANLearner, basic_generator, basic_critic
    set_seed(0)
    noise,imgs = torch.randn(224,100),torch.randn(224,3,16,16)
    dls = DataLoaders.from_dsets(list(zip(noise,imgs)), list(zip(noise,imgs))[:16], bs=16, device='cpu', shuffle=False)
    gen,crit = basic_generator(16, 3, n_extra_layers=0),basic_critic(16, 3, n_extra_layers=0)
    learn = GANLearner.wgan(dls, gen, crit, opt_func=RMSProp)
    learn.gan_trainer.show_img = False
    cp = fit_profiled(learn, n_batches=None, skip=2)
    assert {p['label'] for p in cp.patterns} == {'generator','critic'} and all(p['recs'] is not None for p in cp.patterns)
    z,real = noise[:16],imgs[:16]
    def train(m, on): [p.requires_grad_(on) for p in m.parameters()]  # as `GANTrainer` freezes the model that only computes the loss
    # a generator step: generator(noise) -> critic(fake).mean(); a critic step: critic(real), then generator (no gradient) and critic on the fake
    train(gen, True); train(crit, False)
    g_f,out = macs(lambda: crit(gen(z)).mean()); g_b,_ = macs(lambda: out.backward())
    train(gen, False); train(crit, True)
    def crit_step():
        real_pred = crit(real); fake = gen(z).requires_grad_(False)
        return crit(fake).mean() - real_pred.mean()
    c_f,out = macs(crit_step); c_b,_ = macs(lambda: out.backward())
    sg,sc = cp.summary('generator'),cp.summary('critic')
    check_counts(sg, g_f, g_b); check_counts(sc, c_f, c_b)
    gb = sg.df[sg.df.name.str.startswith('generator')].bwd_macs.sum()
    assert gb > 0 and sc.df[sc.df.name.str.startswith('generator')].bwd_macs.sum() == 0
    assert any('forward and loss' in n for n in sg.notes)
    with pytest.raises(ValueError, match='No batch pattern'): cp.summary('discriminator')
    for p in range(2): rows_inside_step(cp, p)
