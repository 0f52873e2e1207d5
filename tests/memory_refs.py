"Independent references for the memory predictions: real training batches of a fastai `Learner`, measured by PyTorch's own tools."
import torch, torchvision
from fastai.vision.all import vision_learner, unet_learner, resnet18, Learner, CrossEntropyLossFlat
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import set_seed
from cnn_cost.core import flat_tensors

def rand_dls(bs, shape, n_cls=10, seg=False, n_batches=1, device=None):
    "fastai `DataLoaders` of random images of `shape` (and random labels, or masks if `seg`): `n_batches` training batches of `bs`"
    set_seed(0)
    n = bs*n_batches
    x,y = torch.randn(n, *shape),torch.randint(0, n_cls, (n, *shape[1:]) if seg else (n,))
    ds = list(zip(x, y))
    return DataLoaders(DataLoader(ds, bs=bs, shuffle=False, drop_last=True), DataLoader(ds[:2], bs=2), device=device)

def tv_learner(arch, bs, size, device=None, n_batches=1):
    "A randomly initialised torchvision `arch` with 10 classes in a fastai `Learner` on random `size`² images"
    set_seed(0)
    return Learner(rand_dls(bs, (3,size,size), n_batches=n_batches, device=device), torchvision.models.get_model(arch, weights=None, num_classes=10),
                   loss_func=CrossEntropyLossFlat())

def unet(bs=2, size=64, n_cls=3, device=None, n_batches=1):
    "fastai's `unet_learner` on a resnet18 body, random images and masks"
    set_seed(0)
    return unet_learner(rand_dls(bs, (3,size,size), n_cls, seg=True, n_batches=n_batches, device=device), resnet18, pretrained=False, n_out=n_cls,
                        loss_func=CrossEntropyLossFlat(axis=1))

def typed_unet(bs=4, size=64, n_cls=3, n_batches=1):
    "fastai's `unet_learner` on a resnet18 body with fastai's typed batches (`TensorImage`, `TensorMask`), from data in memory"
    from fastai.torch_core import TensorImage, TensorMask
    set_seed(0)
    n = bs*n_batches
    ds = list(zip(TensorImage(torch.randn(n, 3, size, size)), TensorMask(torch.randint(0, n_cls, (n, size, size)))))
    dls = DataLoaders(DataLoader(ds, bs=bs, shuffle=False, drop_last=True), DataLoader(ds[:2], bs=2))
    return unet_learner(dls, resnet18, pretrained=False, n_out=n_cls, loss_func=CrossEntropyLossFlat(axis=1))

def _opt_tensors(opt):
    st = opt.opt.state if hasattr(opt, 'opt') and hasattr(opt.opt, 'state') else opt.state
    return [v for d in st.values() for v in d.values() if isinstance(v, torch.Tensor)]

def _held(model):
    "Tensors `model`'s modules hold in plain attributes (a cache or hidden state a forward made): `MemTracker` sees a tensor only once an op makes it or a module takes it"
    return [t for m in model.modules() for k,v in vars(m).items() if k not in ('_parameters', '_buffers', '_modules') for t in flat_tensors(v)]

def _batch_quiet(learn, b=None):
    "One real training batch `b` (default: one of `dls.train`) through fastai's own loop (`Learner.one_batch`), without logging"
    mp = getattr(learn, 'mixed_precision', None)  # its autocast and scaler exist only inside a fit
    with learn.no_logging(), learn.no_bar():
        learn.training = True; learn.model.train()
        if mp is not None: mp.before_fit()
        try: learn.one_batch(0, learn.dls.train.one_batch() if b is None else b)
        finally:
            if mp is not None: mp.after_fit()

def cpu_peak(learn):
    "PyTorch `MemTracker`'s peak of live tensor bytes over one real CPU training batch of `learn`, after one warm-up epoch and a training batch (a steady-state step)"
    from torch.distributed._tools.mem_tracker import MemTracker
    with learn.no_logging(), learn.no_bar(): learn.fit(1)
    _batch_quiet(learn)  # what a training batch leaves on the learner and its callbacks (`pred`, the losses), alive until the next replaces it
    left = [t for o in (learn, *learn.cbs) for k,v in vars(o).items() if k in ('pred', 'loss', 'loss_grad', 'raw_out', 'out') for t in flat_tensors(v)]
    mt = MemTracker()
    mt.track_external(learn.model, *[p.grad for p in learn.model.parameters() if p.grad is not None], *_opt_tensors(learn.opt), *_held(learn.model), *left, *flat_tensors(b := learn.dls.train.one_batch()))
    del left  # the batch made outside: the data loader's own tensors are not the step's
    with mt: _batch_quiet(learn, b)
    return mt.get_tracker_snapshot('peak')[torch.device('cpu')]['Total']

def real_saved(learn):
    "`hooked_saved` of `learn`'s model on one training batch"
    b = learn.dls.train.one_batch()
    n = getattr(learn.dls.train, 'n_inp', 1)
    return hooked_saved(learn.model, b[:n], b[n:], learn.loss_func)

def cuda_peak(learn):
    "`torch.cuda.max_memory_allocated` over a real training epoch of `learn` on the GPU, after a warm-up epoch"
    with learn.no_logging(), learn.no_bar(): learn.fit(1)
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    with learn.no_logging(), learn.no_bar(): learn.fit(1)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()

def fits(make, bs):
    "Whether two real training batches of `make(bs)` run on the GPU without running out of memory"
    learn = None
    try:
        learn = make(bs)
        with learn.no_logging(), learn.no_bar(): learn.fit(1)
        return True
    except torch.OutOfMemoryError: return False
    except RuntimeError as e:  # cuBLAS or cuDNN failing to allocate their workspace is running out of memory too
        if any(k in str(e) for k in ('ALLOC_FAILED', 'out of memory')): return False
        raise
    finally:
        del learn
        import gc; gc.collect(); torch.cuda.empty_cache()

def trial_max_batch(make, start=8, max_bs=2**14):
    "The largest batch that fits, found by trial as Lightning's `BatchSizeFinder` does: double until out of memory, then bisect"
    lo,hi = 0,start
    while hi<=max_bs and fits(make, hi): lo,hi = hi,2*hi
    while hi-lo>1:
        mid = (lo+hi)//2
        if fits(make, mid): lo = mid
        else: hi = mid
    return lo

def _fwd(model, xb, yb, loss_func, prev=None):
    """`[pred, loss_grad, loss]` as fastai's loop makes them (what callbacks keep of the predictions and add to the loss, for a `learner_loss`);
    `prev`, the last batch's, each released as its replacement is made, as the learner's attributes are replaced"""
    prev = prev or [None]*3
    pred = model(*xb)
    if hasattr(loss_func, 'kept'): pred = loss_func.kept(pred)
    prev[0] = None
    loss = loss_func(pred, *yb); prev[1] = None
    l = loss.clone(); prev[2] = None
    if hasattr(loss_func, 'after_loss'): loss_func.after_loss(pred, loss)
    return [pred, loss, l]

def _steps(model, xb, yb, loss_func, opt_func):
    "A function running one training step as fastai's `Learner` does, from the last one's `[pred, loss_grad, loss]`, and the first step's (a warm-up)"
    opt = opt_func(list(model.parameters()), lr=1e-3)
    def step(prev=None):
        r = _fwd(model, xb, yb, loss_func, prev); r[1].backward(); opt.step(); opt.zero_grad()
        return r
    model.train()
    return step,step(),opt

def hooked_saved(model, xb, yb, loss_func):
    """Bytes autograd saves in a real forward and loss of `model` on `(xb, yb)`, each storage once; parameters, buffers and the batch left out.
    After a first forward and backward, as `step_peak` measures a steady-state step: state a forward keeps (an RNN's hidden state) is the last step's"""
    from cnn_cost.core import flat_tensors
    model.train(); _fwd(model, xb, yb, loss_func)[1].backward()
    for p in model.parameters(): p.grad = None
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *flat_tensors((xb, yb))]}
    seen = {}
    def pack(t):  # each storage held until the end: a freed one's address could be another's later
        st = t.untyped_storage()
        if st.data_ptr() not in skip: seen[st.data_ptr()] = st
        return t.detach()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): r = _fwd(model, xb, yb, loss_func)
    del r
    return sum(st.nbytes() for st in seen.values())

def step_peak(model, xb, yb, loss_func, opt_func):
    "PyTorch `MemTracker`'s peak over one real CPU training step as fastai's `Learner` runs it (`pred`, loss and its clone kept until the next step's replace them, backward, `opt.step`, `opt.zero_grad`), after a warm-up step"
    from torch.distributed._tools.mem_tracker import MemTracker
    from cnn_cost.core import flat_tensors
    step,r,opt = _steps(model, xb, yb, loss_func, opt_func)
    mt = MemTracker()
    mt.track_external(model, *[p.grad for p in model.parameters() if p.grad is not None], *_opt_tensors(opt), *flat_tensors((xb, yb)), *_held(model), *flat_tensors(r))
    with mt: r = step(r)
    del r
    return mt.get_tracker_snapshot('peak')[torch.device('cpu')]['Total']

def alloc_peak(model, xb, yb, loss_func, opt_func):
    """Peak bytes of the CPU allocator over one real training step as `step_peak` runs it, after a warm-up step: the storages live at its start
    (parameters, buffers, gradients, optimizer state, batch, tensors held in plain attributes) plus the highest running sum of the allocations and
    frees `torch.profiler` records (`profile_memory=True`). Unlike the tensor-level references it sees what kernels allocate and free inside themselves"""
    from torch.profiler import profile, ProfilerActivity
    step,r,opt = _steps(model, xb, yb, loss_func, opt_func)
    live = [*model.parameters(), *model.buffers(), *[p.grad for p in model.parameters() if p.grad is not None], *_opt_tensors(opt), *flat_tensors((xb, yb)), *_held(model), *flat_tensors(r)]
    base = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in live}.values())
    del live
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p: r = step(r)
    del r
    run = top = 0
    for e in sorted((e for e in p.profiler.kineto_results.events() if e.name()=='[memory]'), key=lambda e: e.start_ns()):
        run += e.nbytes(); top = max(top, run)
    return base + top

def op_diff(fk, real):
    "The aten ops whose outputs the fake step sizes unlike the real one: `{op: (fake bytes, real bytes)}`, from the two `MemCounter`s' blocks in order"
    from collections import Counter
    f,r = Counter(),Counter()
    for b in fk.blocks: f[b.op] += b.nbytes
    for b in real.blocks: r[b.op] += b.nbytes
    return {k: (f[k], r[k]) for k in sorted(set(f)|set(r)) if f[k]!=r[k]}

def corpus_check(name, make, opt_func=None):
    """Prediction (CPU target, fake tensors) of the step of `make()` -> `(model, xb, yb, loss_func)` against three references on real CPU steps:
    saved bytes (saved-tensor hooks), peak (`MemTracker`), and every kind and op (cnn_cost's own real step, `fake=False`); each on a fresh `make()`"""
    from cnn_cost.memory import predict_memory, step_memory, MemKind
    from fastai.optimizer import Adam
    opt_func = opt_func or Adam
    def get():
        set_seed(0)
        m,xb,yb,lf = make()[:4]
        return m,(xb if isinstance(xb, tuple) else (xb,)),(yb if isinstance(yb, tuple) else (yb,)),lf
    m,xb,yb,lf = get()
    ms = predict_memory(m, xb, yb, lf, opt_func)
    fk = step_memory(m, xb, yb, lf, opt_func).counter
    m,xb,yb,lf = get(); real = step_memory(m, xb, yb, lf, opt_func, fake=False).counter
    m,xb,yb,lf = get(); saved = hooked_saved(m, xb, yb, lf)
    m,xb,yb,lf = get(); peak = step_peak(m, xb, yb, lf, opt_func)
    kinds = lambda mc: {k.value: sum(b.nbytes for b in mc.blocks if b.kind==k) for k in MemKind}
    kf,kr = kinds(fk),kinds(real)
    return dict(name=name, pred_saved=ms.saved_total, real_saved=saved, pred_peak=ms.peak, real_peak=peak, kinds_equal=kf==kr,
                kinds_diff={k: kf[k]-kr[k] for k in kf if kf[k]!=kr[k]}, ops_diff=op_diff(fk, real), flags=sorted(ms.flags))

def op_mismatches(make, opt_func=None):
    """Every aten op of one real CPU training step of `make()` whose fake (meta) kernel, run on fake copies of the same inputs, gives outputs of
    another shape, stride or storage size, or shares storages differently: `{op: what differs}` (torch's own kernels, before any `fake_fix`)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map_only, tree_flatten
    from fastai.optimizer import Adam
    res = {}
    class Check(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default) or \
               any(t in func.tags for t in (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output, torch.Tag.inplace_view)): return out
            try:
                with FakeTensorMode() as fm:
                    fa,fk = tree_map_only(torch.Tensor, lambda t: fm.from_tensor(t, static_shapes=True), (args, kwargs))
                    fo = func(*fa, **fk)
            except Exception: return out
            ro,fo = [t for t in tree_flatten(out)[0]],[t for t in tree_flatten(fo)[0]]
            diffs = []
            for j,(r,f) in enumerate(zip(ro, fo)):
                if not isinstance(r, torch.Tensor) or not isinstance(f, torch.Tensor): continue
                if r.shape!=f.shape: diffs.append(f'output {j} shape {tuple(f.shape)} vs real {tuple(r.shape)}')
                elif not torch._prims_common.check_significant_strides(r, f, only_cuda=False)[0]: diffs.append(f'output {j} strides {f.stride()} vs real {r.stride()}')  # size-1 dims' strides do not matter
                if r.untyped_storage().nbytes()!=f.untyped_storage().nbytes():
                    diffs.append(f'output {j} storage {f.untyped_storage().nbytes()} B vs real {r.untyped_storage().nbytes()} B')
            st = lambda ts: [[i for i,u in enumerate(ts) if isinstance(u, torch.Tensor) and isinstance(t, torch.Tensor) and u.untyped_storage()._cdata==t.untyped_storage()._cdata]
                             for t in ts]
            if st(ro)!=st(fo): diffs.append('outputs share storages differently')
            if diffs: res.setdefault(str(func), set()).update(diffs)
            return out
    set_seed(0)
    m,xb,yb,lf = make()[:4]
    xb,yb = (xb if isinstance(xb, tuple) else (xb,)),(yb if isinstance(yb, tuple) else (yb,))
    opt = (opt_func or Adam)(list(m.parameters()), lr=1e-3)
    m.train()
    with Check():
        loss = lf(m(*xb), *yb); loss.backward(); opt.step(); opt.zero_grad()
    return {k: sorted(v) for k,v in res.items()}
