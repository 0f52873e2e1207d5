"Independent references for the memory predictions: real training batches of a fastai `Learner`, measured by PyTorch's own tools."
import torch, torchvision
from fastai.vision.all import vision_learner, unet_learner, resnet18, Learner, CrossEntropyLossFlat
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.torch_core import set_seed

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

def _opt_tensors(opt):
    st = opt.opt.state if hasattr(opt, 'opt') and hasattr(opt.opt, 'state') else opt.state
    return [v for d in st.values() for v in d.values() if isinstance(v, torch.Tensor)]

def _batch_quiet(learn):
    "One real training batch through fastai's own loop (`Learner.one_batch`), without logging"
    with learn.no_logging(), learn.no_bar():
        learn.training = True; learn.model.train()
        learn.one_batch(0, learn.dls.train.one_batch())

def cpu_peak(learn):
    "PyTorch `MemTracker`'s peak of live tensor bytes over one real CPU training batch of `learn`, after one warm-up epoch (a steady-state step)"
    from torch.distributed._tools.mem_tracker import MemTracker
    with learn.no_logging(), learn.no_bar(): learn.fit(1)
    mt = MemTracker()
    mt.track_external(learn.model, *[p.grad for p in learn.model.parameters() if p.grad is not None], *_opt_tensors(learn.opt))
    with mt: _batch_quiet(learn)
    return mt.get_tracker_snapshot('peak')[torch.device('cpu')]['Total']

def real_saved(learn):
    "Bytes autograd saves in a real forward and loss of `learn` on one batch, each storage once; parameters, buffers and the batch left out"
    xb = learn.dls.train.one_batch()
    n = getattr(learn.dls.train, 'n_inp', 1)
    skip = {t.untyped_storage().data_ptr() for t in [*learn.model.parameters(), *learn.model.buffers(), *xb]}
    seen = {}
    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip: seen[st.data_ptr()] = st.nbytes()
        return t.detach()
    learn.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = learn.loss_func(learn.model(*xb[:n]), *xb[n:])
    del loss
    return sum(seen.values())

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

def hooked_saved(model, xb, yb, loss_func):
    "Bytes autograd saves in a real forward and loss of `model` on `(xb, yb)`, each storage once; parameters, buffers and the batch left out"
    from cnn_cost.core import flat_tensors
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *flat_tensors((xb, yb))]}
    seen = {}
    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip: seen[st.data_ptr()] = st.nbytes()
        return t.detach()
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): loss = loss_func(model(*xb), *yb)
    del loss
    return sum(seen.values())

def step_peak(model, xb, yb, loss_func, opt_func):
    "PyTorch `MemTracker`'s peak over one real CPU training step as fastai's `Learner` runs it (`pred`, loss and its clone kept, backward, `opt.step`, `opt.zero_grad`), after a warm-up step"
    from torch.distributed._tools.mem_tracker import MemTracker
    from cnn_cost.core import flat_tensors
    opt = opt_func(list(model.parameters()), lr=1e-3)
    def step():
        pred = model(*xb); loss = loss_func(pred, *yb); l = loss.clone(); loss.backward(); opt.step(); opt.zero_grad()
        return pred, loss, l
    model.train(); r = step(); del r
    mt = MemTracker()
    mt.track_external(model, *[p.grad for p in model.parameters() if p.grad is not None], *_opt_tensors(opt), *flat_tensors((xb, yb)))
    with mt: r = step()
    del r
    return mt.get_tracker_snapshot('peak')[torch.device('cpu')]['Total']

def corpus_check(name, model, xb, yb, loss_func, opt_func=None):
    "Prediction (CPU target, fake tensors) against three references on real CPU steps: saved bytes (saved-tensor hooks), peak (`MemTracker`), and every kind (cnn_cost's own real step, `fake=False`)"
    import copy
    from cnn_cost.memory import predict_memory, step_memory, MemKind
    from fastai.optimizer import Adam
    from cnn_cost.core import flat_tensors
    opt_func = opt_func or Adam
    xb,yb = (xb if isinstance(xb, tuple) else (xb,)),(yb if isinstance(yb, tuple) else (yb,))
    set_seed(0)
    ms = predict_memory(model, xb, yb, loss_func, opt_func)
    kinds = lambda mc: {k.value: sum(b.nbytes for b in mc.blocks if b.kind==k) for k in MemKind}
    real,_,_ = step_memory(copy.deepcopy(model), xb, yb, loss_func, opt_func, fake=False)
    fk,_,_ = step_memory(model, xb, yb, loss_func, opt_func)
    saved = hooked_saved(copy.deepcopy(model), xb, yb, loss_func)
    peak = step_peak(copy.deepcopy(model), xb, yb, loss_func, opt_func)
    kf,kr = kinds(fk),kinds(real)
    return dict(name=name, pred_saved=ms.saved_total, real_saved=saved, pred_peak=ms.peak, real_peak=peak,
                kinds_equal=kf==kr, kinds_diff={k: kf[k]-kr[k] for k in kf if kf[k]!=kr[k]}, flags=sorted(ms.flags) if hasattr(ms, 'flags') else [])
