"The memory plan against real steps: the checkpointed step's peak predicted on fake tensors equals a real CPU step, and training with the plan applied is bit-identical."
import pytest, torch, torchvision
from fastai.vision.all import Learner, CrossEntropyLossFlat, set_seed, Callback
from cnn_cost.core import block_names
from cnn_cost.memory import step_memory, MemorySummary, learner_batch
from cnn_cost.plan import *
from cnn_cost.plan import checkpointed, inner_blocks
from memory_refs import tv_learner, rand_dls, cpu_peak, unet
from conftest import heavy

def vit(bs=8, size=32):
    "torchvision's vit_b_16 on 32² images (4 tokens and the class token), with dropout, so that the recompute must replay the RNG"
    set_seed(0)
    return Learner(rand_dls(bs, (3,size,size), n_batches=2), torchvision.models.vit_b_16(image_size=size, num_classes=10, dropout=0.1, attention_dropout=0.1),
                   loss_func=CrossEntropyLossFlat())

# the budget: this fraction of the way from the step as it is to the step with every block checkpointed
cases = {'resnet50': (lambda: tv_learner('resnet50', 4, 64, n_batches=2), 0.25), 'vit_b_16': (vit, 0.25), 'unet': (lambda: unet(bs=4, size=96, n_batches=2), 0.3)}

@pytest.mark.parametrize('name', heavy(cases, ('resnet50', 'vit_b_16', 'unet')))
def test_plan_peak_is_real(name):
    "The checkpointing option needs 2-4 blocks, fits, and its predicted peak equals a real CPU step's (`fake=False`) to the byte and MemTracker's over a real fastai batch"
    make,f = cases[name]
    learn = make()
    full = learn.memory_summary(device='cpu').peak
    with checkpointed(learn.model, inner_blocks(learn.model)): floor = learn.memory_summary(device='cpu').peak
    plan = learn.memory_plan((full-f*(full-floor))/2**30, device='cpu', show_plot=False)
    k = plan['checkpointing']
    assert k.fits and 2 <= len(k.blocks) <= 4 and not plan['as is'].fits
    assert k.recompute_macs > 0 and 0 < k.extra < 0.5
    xb,yb = learner_batch(learn, None, None)
    with checkpointed(learn.model, k.blocks): rec = step_memory(learn.model, xb, yb, learn.loss_func, learn.opt_func, fake=False); mc,c = rec.counter,rec.counting
    real = MemorySummary(mc.blocks, mc.trace, c.units, c.recs).peak
    learn.checkpoint(plan if plan.suggestion is k else k)
    ms = learn.memory_summary(device='cpu')  # review finding: the learner's prediction follows the callback (before: the unplanned peak)
    assert ms.peak == k.peak and len(ms.trained_as) == 1 and ms.trained_as[0] == ms.notes[-1] and learn.max_batch(plan.budget/2**30, device='cpu', show_plot=False).bs >= 4
    with checkpointed(learn.model, k.blocks): ref = cpu_peak(learn)  # a warm-up fit with the callback, then one real batch checkpointed as the callback does
    print(f"{name}: torch {torch.__version__}, budget {plan.budget:,} B, as is {full:,} B, checkpointing {len(k.blocks)} blocks {k.blocks}: "
          f"predicted {k.peak:,} B, real step {real:,} B, MemTracker {ref:,} B ({k.peak/ref-1:+.3%}); recompute {k.extra:.1%} of the step's MACs")
    assert real == k.peak
    assert abs(k.peak/ref-1) < 0.02

def _fit(make, blocks):
    learn = make()
    if blocks: learn.checkpoint(blocks)
    with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-3)
    return [float(l) for l in learn.recorder.losses],learn.model.state_dict(),learn

@pytest.mark.parametrize('name', heavy(cases, ('resnet50', 'vit_b_16', 'unet')))
def test_plan_training_unchanged(name):
    "Training with blocks checkpointed (float32, CPU): the same losses and weights and buffers, bit for bit; nothing left on the model or learner"
    make,_ = cases[name]
    bl = inner_blocks(make().model)
    bl = bl[:1] + bl[len(bl)//2:len(bl)//2+2]  # three blocks, the first among them (whose recompute updates batch norms' statistics)
    (l0,s0,_),(l1,s1,learn) = _fit(make, None),_fit(make, bl)
    assert len(l0) >= 2 and l0 == l1
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert '_do_one_batch' not in vars(learn) and not any('forward' in vars(m) for m in learn.model.modules())

@pytest.mark.parametrize('bs', [31, 50])
def test_accumulation_keeps_the_batch(bs):
    """Review finding: every option trains batches of exactly `bs` samples (fastai's `GradientAccumulation(n_acc=bs)` steps once it has counted `bs`
    or more, so 6 x 6 for 32 would step at 36; a prime 31 accumulates 31 x 1 rather than 5 x 7); the names print whole"""
    set_seed(0)
    learn = Learner(rand_dls(bs, (3, 16, 16)), torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)), loss_func=CrossEntropyLossFlat())
    full = learn.memory_summary(bs=bs, device='cuda').peak
    plan = learn.memory_plan(0.3*full/2**30, bs=bs, device='cuda')
    acc = [o for o in plan.options if o.n_acc > 1]
    assert acc and all(o.micro*o.n_acc == bs for o in plan.options), [(o.name, o.n_acc, o.micro) for o in plan.options]
    rows = plan._text_table()[4:-1]
    assert len(rows) == len(plan.options) and all(l.startswith(o.name + ' ') for l,o in zip(rows, plan.options))  # each row starts with its option's whole name

def test_plan_reads_at_a_glance():
    "The plan in `text_table`'s layout, then the suggestion and its price in short facts; `amp_skipped`, `already_amp`, `nothing_fits` are attributes, a sentence only when they hold"
    set_seed(0)
    learn = Learner(rand_dls(32, (3, 16, 16)), torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)), loss_func=CrossEntropyLossFlat())
    full,fc = learn.memory_summary(bs=32, device='cuda').peak,learn.memory_summary(bs=32, device='cpu').peak
    cu,cpu,h = [learn.memory_plan(0.3*p/2**30, bs=32, device=d, dtype=dt, show_plot=False) for p,d,dt in [(full, 'cuda', None), (fc, 'cpu', None), (full, 'cuda', 'fp16')]]
    big,none = [learn.memory_plan(b, bs=32, device='cuda', show_plot=False) for b in (100, 1e-6)]
    for p in (cu, cpu, h, big, none):
        assert len(p.facts()) <= 8 and len(str(p).splitlines()) == len(p._text_table()) + len(p.facts()) + len(p.conditions())
        assert len(p._text_table()) == 5 + len(p.options) and p.notes[-1].startswith('Ranked')  # the full ranking rule in the notes
    assert [(p.cuda, p.amp_skipped, p.already_amp, p.nothing_fits, p.measured, len(p.conditions())) for p in (cu, cpu, h, big, none)] == [
        (True, False, False, False, False, 0), (False, True, False, False, False, 1), (True, False, True, False, False, 1),
        (True, False, False, False, False, 0), (True, False, False, True, False, 0)]
    assert none.suggestion is None and big.suggestion.name == 'as is' and len(none.facts()) == 2

def test_plan_language_model():
    "Review finding: the plan feeds the loss as fastai's `RNNCallback` does (it crashed on a language model); 'as is' equals `memory_summary`"
    import kinds
    learn = kinds.language_model(bs=4)
    p = learn.memory_summary(device='cpu').peak
    plan = learn.memory_plan(0.9*p/2**30, device='cpu', show_plot=False)
    assert plan['as is'].peak == p and not plan['as is'].fits and plan.suggestion.fits

def test_checkpoint_needs_blocks():
    "Second review: a plan whose suggestion checkpoints nothing is not applied as an empty `CheckpointBlocks`: the error says how to apply it"
    import kinds
    learn = kinds.language_model(bs=4)
    plan = learn.memory_plan(0.8*learn.memory_summary(device='cpu').peak/2**30, device='cpu', show_plot=False)
    assert plan.suggestion.name == 'gradient accumulation' and plan.blocks == ()
    with pytest.raises(ValueError, match='GradientAccumulation'): learn.checkpoint(plan)
    assert not [cb for cb in learn.cbs if isinstance(cb, CheckpointBlocks)]

def test_scripted_block():
    "A TorchScript block: `checkpointed` names it and says what to do instead of running into the TorchScript interpreter's error, and changes no forward"
    m = torch.nn.Sequential(torch.nn.Conv2d(3,8,3,padding=1), torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(8,8,3,padding=1), torch.nn.ReLU())), torch.nn.Conv2d(8,8,3))
    with pytest.raises(ValueError, match='TorchScript'):
        with checkpointed(m, ['2', '1']): pass
    assert 'forward' not in vars(m[2]) and type(m[1]).__name__=='RecursiveScriptModule'
    with checkpointed(m, ['2']): m(torch.randn(2,3,8,8)).sum().backward()  # the eager one still checkpoints
    assert 'forward' not in vars(m[2])

def test_budget_in_bytes_refused():
    "Review 3 item 2: a budget given in bytes (more than 16384 GiB) gets a clear error before anything runs, in `memory_plan` and `max_batch` alike"
    learn = Learner(rand_dls(4, (3, 8, 8)), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3*8*8, 10)), loss_func=CrossEntropyLossFlat())
    w = [(p, p.detach().clone()) for p in learn.model.parameters()]
    for f,b in [(lambda b: learn.memory_plan(b, device='cpu', show_plot=False), 110e6), (lambda b: learn.max_batch(b, device='cpu', show_plot=False), 200e6)]:
        with pytest.raises(ValueError, match=rf'budget is in GiB: did you mean .*= {b/2**30:.3g} GiB'): f(b)
    assert all(p is q and p.equal(v) for (p,v),q in zip(w, learn.model.parameters())) and not learn.model[1]._forward_hooks
    assert learn.max_batch(16384, device='cpu', max_bs=4, show_plot=False).capped  # the largest budget taken

def test_budget_not_a_number_refused():
    "A budget that is not a positive number of GiB ('20 MB', 0, a bool) gets a clear error in `memory_plan` and `max_batch`, before anything runs"
    learn = Learner(rand_dls(4, (3, 8, 8)), torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3*8*8, 10)), loss_func=CrossEntropyLossFlat())
    for b in ['20 MB', 0, -1., True]:
        for f in (learn.memory_plan, learn.max_batch):
            with pytest.raises(ValueError, match='positive number of GiB'): f(b, device='cpu', show_plot=False)
    assert not learn.model[1]._forward_hooks

def test_compiled_model_plan():
    "A `torch.compile`d model is planned as its own module: the same options and peaks, its blocks by their names, the model named as it is"
    def learner(compiled):
        set_seed(0)
        blk = lambda: torch.nn.Sequential(torch.nn.Conv2d(16,16,3,padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        m = torch.nn.Sequential(torch.nn.Conv2d(3,16,3,padding=1), blk(), blk(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16,10))
        return Learner(rand_dls(8, (3, 16, 16)), torch.compile(m) if compiled else m, loss_func=CrossEntropyLossFlat())
    b = 0.7*learner(False).memory_summary(device='cpu').peak/2**30  # as it is, the step does not fit
    plans = [learner(c).memory_plan(b, device='cpu', show_plot=False) for c in (False, True)]
    (e,c) = [[(o.name, o.peak, o.blocks) for o in p.options] for p in plans]
    assert e==c and any(o[2] for o in c) and plans[1].model_name=='Sequential'

def test_without_accelerate():
    """`pip install cnn_cost` brings no accelerate, which `fastai.distributed` needs: the package imports and the CLI runs without it, and
    `learn.shard` says what to install before it changes anything"""
    import subprocess, sys
    code = ("import sys; sys.modules['accelerate'] = None\n"  # as if not installed
            "import torch, torch.nn as nn, cnn_cost.all\nfrom cnn_cost.cli import main\nfrom fastai.test_utils import synth_learner\n"
            "learn = synth_learner(); ids = [id(p) for p in learn.model.parameters()]\n"
            "try: learn.shard()\nexcept ImportError as e: print('refused:', e)\n"
            "assert [id(p) for p in learn.model.parameters()]==ids and not any('Sharded' in type(c).__name__ for c in learn.cbs)")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode==0, r.stderr[-2000:]
    assert 'refused:' in r.stdout and 'pip install accelerate' in r.stdout

def test_max_batch_peaks_print_apart():
    "Review 3 item 2: two sizes whose peaks differ print different peaks, with as many digits as that takes; equal peaks print alike"
    from cnn_cost.memory import gib
    p1,p2 = int(0.5*2**30),int(0.5*2**30)+300_000
    assert gib(p1) == gib(p2)  # the case: 3 digits print both as 0.5 GiB
    r = MaxBatch(870, p2, 2**30, [869, 870, 871], [p1, p2, p2])
    peaks = [l.split()[1] for l in r._text_table() if l.split() and l.split()[0] in ('869', '870', '871')]
    assert len(peaks) == 3 and peaks[0] != peaks[1] and peaks[1] == peaks[2] and float(peaks[0]) < float(peaks[1])

class _Raise(Callback):
    "Raises `RuntimeError` at event `at` of the first training batch"
    def __init__(self, at): self.at = at
    def __getattr__(self, k):
        if k==self.__dict__.get('at'): return self._boom
        return super().__getattr__(k)
    def _boom(self):
        if self.training: raise RuntimeError('boom')

class _Blk(torch.nn.Module):
    "A conv block that counts its calls (the recompute calls it again) and can raise in its forward"
    def __init__(self): super().__init__(); self.c,self.n,self.fail = torch.nn.Conv2d(8,8,3,padding=1),0,False
    def forward(self, x):
        self.n += 1
        if self.fail: raise RuntimeError('boom in forward')
        return torch.relu(self.c(x))+x

def _ck_learner():
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    set_seed(0); x,y = torch.randn(16,3,8,8),torch.randint(0,4,(16,))
    ds = list(zip(x,y)); dls = DataLoaders(DataLoader(ds, bs=8, drop_last=True), DataLoader(ds[:8], bs=8))
    m = torch.nn.Sequential(torch.nn.Conv2d(3,8,3,padding=1), _Blk(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8,4))
    return Learner(dls, m, loss_func=CrossEntropyLossFlat())

@pytest.mark.parametrize('where', ['after_loss', 'forward'])
@pytest.mark.parametrize('prof', [False, True])
def test_checkpoint_failed_fit_leaves_nothing(where, prof):
    "Review: a fit that dies of an error fastai calls no event for (in `after_loss`, in the forward) leaves no checkpointing forward, no root hook; the model pickles"
    import io, pickle
    from cnn_cost.callback import CostProfiler
    learn = _ck_learner().checkpoint(['1'])
    cbs = [_Raise('after_loss')] if where=='after_loss' else []
    if where=='forward': learn.model[1].fail = True
    if prof: cbs.append(CostProfiler(skip=0))
    with pytest.raises(RuntimeError, match='boom'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=cbs)
    assert not [n for n,m in learn.model.named_modules() if 'forward' in vars(m)]
    assert not learn.model._forward_hooks and not learn.model._forward_hooks_always_called
    torch.save(learn.model, io.BytesIO())  # raised "Can't pickle local object '_ckpt_forward.<locals>.forward'"
    learn.model[1].fail,n = False,learn.model[1].n
    learn.model.train(); learn.model(torch.randn(2,3,8,8)).sum().backward()
    assert learn.model[1].n==n+1  # no checkpoint left: no recompute

def test_checkpoint_recomputes_with_forward_back():
    "The blocks' `forward` is back as soon as the model's forward returns, yet the backward recomputes: the block runs twice a training batch"
    learn = _ck_learner().checkpoint(['1'])
    class Look(Callback):
        order = 100
        def after_pred(self): self.seen = 'forward' in vars(self.learn.model[1]) or bool(self.learn.model._forward_hooks)
    lk = Look()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=[lk])
    assert lk.seen is False and learn.model[1].n==2*2+1  # 2 training batches checkpointed, 1 validation batch
    assert 'forward' not in vars(learn.model[1]) and not learn.model._forward_hooks
