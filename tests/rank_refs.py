"""Reference memory of each rank of a real multi-process training step (CPU, gloo): the peak of live tensor bytes of one steady-state step
and each kind of memory at that peak, to the byte. `run_ranks` launches `rank_worker.py` under `torch.distributed.run`; each rank calls
`rank_step`, which runs the step as `memory_refs._steps` does (fastai's loop: `pred`, loss and its clone kept until the next step's replace
them, backward, `opt.step`, `opt.zero_grad`) under `StorageTracker`, a `TorchDispatchMode` that sees every storage an op makes, the ones made
inside DDP's C++ `Reducer` included (its gradient buckets), from before the model is built. FSDP2 steps are also read by torch's own
`FSDPMemTracker` for its kinds (sharded/unsharded parameters and gradients, all-gather and reduce-scatter buffers).
Not seen, as by torch's own trackers: what a collective's backend allocates outside torch's ops (gloo's own buffers), ops run on other threads, and
the temporaries inside a tensor subclass's dispatch (a `DTensor` op's local intermediates: only its outputs' local shards are counted)."""
import os, sys, json, subprocess, weakref, tempfile, torch, torch.nn as nn
from pathlib import Path
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

c10d = torch.ops.c10d
COLLECTIVES = {c10d._allgather_base_.default: lambda a: ('all-gather', a[0]), c10d._reduce_scatter_base_.default: lambda a: ('reduce-scatter', a[1]),
               c10d.allreduce_.default: lambda a: ('all-reduce', a[0][0])}  # an op -> its name and the buffer it moves (the all-gather's output)
KINDS = ('param', 'buffer', 'grad', 'opt', 'batch', 'saved', 'state', 'rest')  # `state`: alive before the step and none of the others (DDP's buckets)

class StorageTracker(TorchDispatchMode):
    """Every storage an op makes while active (and every `UntypedStorage.resize_`): `cur` live bytes, `peak` since `reset`, `at_peak` {id: bytes}.
    Each storage gets a new id (`ids`: its `_cdata` -> id while alive), as a freed storage's address is soon another's; `made`: id -> (op, phase)"""
    def __init__(self): super().__init__(); self.live,self.ids,self.made,self.cur,self.phase,self.n,self.outside,self.cur_ops,self.rs_bytes = {},{},{},0,'init',0,set(),0,set(); self.reset()
    def reset(self):
        self.peak,self.at_peak,self.peak_phase,self.comm = self.cur,dict(self.live),self.phase,{}  # `comm`: bytes of each collective's buffers
        self.peak_ops = self.cur_ops  # the peak without the storages first seen at a view op (`outside`)
    def _set(self, i, n):
        d = n - self.live.get(i, 0)
        self.cur += d
        if i not in self.outside: self.cur_ops += d
        if n: self.live[i] = n
        else: self.live.pop(i, None)
        if self.cur>self.peak: self.peak,self.at_peak,self.peak_phase = self.cur,dict(self.live),self.phase
        self.peak_ops = max(self.peak_ops, self.cur_ops)
    def _free(self, k, i):
        if self.ids.get(k)==i: del self.ids[k]
        self._set(i, 0)
    def track(self, st, op='', view=False):
        """Count storage `st` from now on, if not yet; its id. A storage first seen at a view op (`view`) with the bytes of a collective's buffer is
        gloo's copy of it (a running reduce-scatter's input), made outside PyTorch's ops: kept in `outside`, which `peak_ops` leaves out"""
        k = st._cdata
        if k in self.ids: return self.ids[k]
        self.n += 1; i = self.ids[k] = self.n
        if view and st.nbytes() in self.rs_bytes: self.outside.add(i)
        self.made[i] = (op, self.phase); weakref.finalize(st, self._free, k, i); self._set(i, st.nbytes())
        return i
    def keys(self, ts): return {self.ids.get(_local(t).untyped_storage()._cdata) for t in ts if isinstance(t, torch.Tensor)} - {None}
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in COLLECTIVES:
            name,buf = COLLECTIVES[func](args); self.comm[name] = self.comm.get(name, 0) + buf.numel()*buf.element_size()
            for t in _plain(tree_flatten(args)[0]): self.rs_bytes |= {t.untyped_storage().nbytes(), t.numel()*t.element_size()}  # the sizes gloo copies
        for t in _plain(tree_flatten(out)[0]):
            if t.is_meta or t.device.type!='cpu': continue
            st = t.untyped_storage(); i = self.track(st, str(func), getattr(func, 'is_view', False))
            if self.live.get(i)!=st.nbytes(): self._set(i, st.nbytes())  # `aten.resize_` and the like grow a storage in place
        return out
    def __enter__(self):
        self._resize,tr = torch.UntypedStorage.resize_,self
        def resize_(st, n):  # FSDP2 frees and re-allocates unsharded parameters by resizing their storages
            r = tr._resize(st, n)
            tr._set(tr.track(st, 'resize_'), st.nbytes())
            return r
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()
    def __exit__(self, *a):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*a)

def _local(t): return t.to_local() if hasattr(t, 'to_local') else t

def _plain(ts):
    "The plain tensors in `ts`, those inside a wrapper subclass (`DTensor`'s local shard) in its place: a wrapper's own storage holds no memory"
    for t in ts:
        if not isinstance(t, torch.Tensor): continue
        if is_traceable_wrapper_subclass(t): yield from _plain(getattr(t, a) for a in t.__tensor_flatten__()[0])
        else: yield t

# --- models: tiny ones for CI, torchvision's resnet18 and a small ViT-like block stack for the corpus
class Blocks(nn.Module):
    "A patch embedding, `n` `TransformerEncoderLayer` blocks (`blocks`), mean pooling and a head: a small ViT"
    def __init__(self, d=64, n=2, heads=4, patch=8, n_cls=10):
        super().__init__()
        self.embed = nn.Conv2d(3, d, patch, stride=patch)
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(d, heads, 2*d, dropout=0., batch_first=True) for _ in range(n)])
        self.head = nn.Linear(d, n_cls)
    def forward(self, x): return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))

def tiny_cnn(n_cls=10):
    return nn.Sequential(nn.Conv2d(3,16,3,padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16,32,3,stride=2,padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32,n_cls))

VOCAB = 100  # the AWD-LSTM language model's vocabulary
class CatNet(nn.Module):
    "`w2` used early (`x @ w2.T`) and late in `cat([w1, w2])`: `w1`'s gradient a slice of the `cat`'s gradient, whose other half waits for `w2`'s early use"
    def __init__(self, d=64):
        super().__init__(); self.w1,self.w2 = nn.Parameter(torch.randn(d, d)*.05),nn.Parameter(torch.randn(d, d)*.05)
        self.mid,self.head = nn.Sequential(nn.Linear(d, 4*d), nn.ReLU(), nn.Linear(4*d, d)),nn.Linear(2*d, 10)
    def forward(self, x):
        h = self.mid(torch.relu(x.flatten(1)[:, :self.w2.shape[1]] @ self.w2.T))
        return self.head(h @ torch.cat([self.w1, self.w2]).T)

def make_model(name, size=32):
    """A fresh model called `name`: 'tiny_cnn', 'tiny_vit', 'vit', fastai's 'unet' (resnet18 encoder, 3 classes per pixel, for `size` x `size`
    images), fastai's 'awd_lm' (a small AWD-LSTM language model), 'cat' (`CatNet`) or a torchvision model name (10 classes)"""
    torch.manual_seed(0)
    if name=='tiny_cnn': return tiny_cnn()
    if name=='cat': return CatNet()
    if name=='tiny_vit': return Blocks(d=32, n=2, heads=2)
    if name=='vit': return Blocks(d=192, n=4, heads=4)
    if name=='unet':
        from fastai.vision.all import create_unet_model, resnet18
        return create_unet_model(resnet18, 3, (size, size), pretrained=False)
    if name=='awd_lm':
        from fastai.text.all import get_language_model, AWD_LSTM, awd_lstm_lm_config
        return get_language_model(AWD_LSTM, VOCAB, config={**awd_lstm_lm_config, 'emb_sz': 64, 'n_hid': 96, 'n_layers': 2})
    import torchvision
    return torchvision.models.get_model(name, weights=None, num_classes=10)

def units(model, inner=False):
    """The blocks FSDP2 shards one by one: the `TransformerEncoderLayer`s, torchvision resnets' `BasicBlock`/`Bottleneck`s, else the top children;
    with `inner`, the package's default (`inner_blocks`)"""
    if inner:
        from cnn_cost.core import inner_blocks
        return [model.get_submodule(n) for n in inner_blocks(model)]
    us = [m for m in model.modules() if type(m).__name__ in ('TransformerEncoderLayer', 'BasicBlock', 'Bottleneck')]
    return us or [m for m in model.children() if any(p.requires_grad for p in m.parameters())]

def unit_names(model, inner=False):
    "Names of `units(model, inner)`, for `predict_memory(..., fsdp_units=...)`"
    us = {id(u) for u in units(model, inner)}
    return [n for n,m in model.named_modules() if id(m) in us]

def batch(bs, size, rank=0, n_cls=10, model=''):
    "`(xb, yb)` of `model`: images and classes; for 'unet' a class per pixel; for 'awd_lm' `size` tokens and the next ones"
    g = torch.Generator().manual_seed(rank)
    if model=='awd_lm': t = torch.randint(0, VOCAB, (bs, size+1), generator=g); return (t[:, :-1].clone(),),(t[:, 1:].clone(),)
    if model=='unet': return (torch.randn(bs, 3, size, size, generator=g),),(torch.randint(0, 3, (bs, size, size), generator=g),)
    return (torch.randn(bs, 3, size, size, generator=g),),(torch.randint(0, n_cls, (bs,), generator=g),)

def setup(cfg, rank=0):
    "`(model, xb, yb, loss_func)` of configuration `cfg` (its model, batch size and size), the batch of `rank`"
    return (make_model(cfg['model'], cfg['size']), *batch(cfg['bs'], cfg['size'], rank, model=cfg['model']), loss_func(cfg['model']))

def loss_func(model=''):
    "Cross-entropy; for 'awd_lm' on the first of its outputs (the decoder's), each token a sample"
    ce = nn.CrossEntropyLoss()
    return (lambda pred, y: ce(pred[0].flatten(0, 1), y.flatten())) if model=='awd_lm' else ce

def opt_func(name):
    from fastai.optimizer import SGD, Adam
    from functools import partial
    return {'sgd': partial(SGD, mom=0.9), 'adam': Adam}.get(name)  # None: a torch optimizer ('tsgd', 'adamw'), whose `zero_grad` sets gradients to None

def _torch_opt(name, params):
    if name=='tsgd': return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name=='adamw': return torch.optim.AdamW(params, lr=1e-3)
    raise ValueError(f"Unknown optimizer {name!r}: use 'sgd', 'adam' (fastai's), 'tsgd' or 'adamw' (torch's)")

def _wrap(model, cfg, mesh=None):
    "`model` as `cfg['strategy']` trains it: 'none', 'ddp' (DDP's kwargs from `cfg`) or 'fsdp' (`fully_shard` per unit, then the root, on `mesh`)"
    s = cfg.get('strategy', 'none')
    if cfg.get('sync_bn'): model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if s=='none': return model
    if s=='ddp':
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, gradient_as_bucket_view=cfg.get('view', False), **({'bucket_cap_mb': cfg['bucket_cap_mb']} if cfg.get('bucket_cap_mb') else {}))
    if s=='fsdp':
        from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
        kw = dict(reshard_after_forward=cfg.get('reshard', True), mesh=mesh)
        if cfg.get('mp'): kw['mp_policy'] = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg['mp']), reduce_dtype=torch.float32)
        for u in units(model, cfg.get('units')=='inner'): fully_shard(u, **kw)
        return fully_shard(model, **kw)
    raise ValueError(f"Unknown strategy {s!r}: use 'none', 'ddp' or 'fsdp'")

def rank_step(cfg, rank=0):
    """One rank's memory of one steady-state training step of `cfg` (model, bs, size, strategy, view, bucket_cap_mb, sync_bn, reshard, mp, opt,
    n_warm): `peak` live tensor bytes, `kinds` {kind: bytes at the peak} (see `KINDS`), the `phase` of the peak, the step's `base` (bytes live at
    its start), the DDP buckets' sizes in bytes (`buckets`) and, for FSDP2, `FSDPMemTracker`'s peak and kinds (`fsdp_peak`, `fsdp_kinds`)"""
    import memory_refs as mr
    torch.manual_seed(0)
    tr = StorageTracker()
    res = {}
    with tr:
        model,xb,yb,lf = setup(cfg, rank)
        model = _wrap(model, cfg)
        of = opt_func(cfg.get('opt', 'sgd'))
        opt = of(list(model.parameters()), lr=1e-3) if of else _torch_opt(cfg.get('opt'), model.parameters())
        model.train()
        grads,saved = set(),set()
        def step(prev=None, pack=None):
            tr.phase = 'fwd'
            with torch.autograd.graph.saved_tensors_hooks(*(pack or (lambda t: t, lambda t: t))): r = mr._fwd(model, xb, yb, lf, prev)
            tr.phase = 'bwd'; r[1].backward()
            grads.update(tr.keys(p.grad for p in model.parameters()))
            tr.phase = 'opt'; opt.step(); opt.zero_grad(); tr.phase = 'end'
            return r
        r = None
        for _ in range(cfg.get('n_warm', 2)): r = step(r)
        grads.clear(); base = tr.cur; pre = set(tr.live); tr.reset()
        def pack(t): saved.add(tr.ids.get(t.untyped_storage()._cdata)); return t
        if cfg.get('strategy')=='fsdp' and cfg.get('fsdp_tracker', True):
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
            ft = FSDPMemTracker(model, opt if isinstance(opt, torch.optim.Optimizer) else None)
            ft.track_inputs((*xb, *yb))
            with ft: r = step(r, (pack, lambda t: t))
            snap = ft.get_tracker_snapshot('peak')[torch.device('cpu')]
            res.update(fsdp_peak=snap['Total'], fsdp_kinds={str(k.value): v for k,v in snap.items() if k!='Total'})
        else: r = step(r, (pack, lambda t: t))
        sets = dict(param=tr.keys(model.parameters()), buffer=tr.keys(model.buffers()), grad=grads | tr.keys(p.grad for p in model.parameters()),
                    opt=tr.keys(mr._opt_tensors(opt)), batch=tr.keys((*xb, *yb)), saved=saved)
    kinds,state,rest = dict.fromkeys(KINDS, 0),[],[]
    for k,n in tr.at_peak.items():  # ids
        kind = next((c for c,s in sets.items() if k in s), 'state' if k in pre else 'rest')
        kinds[kind] += n
        if kind=='state': state.append((n, *tr.made.get(k, ('', ''))))
        if kind=='rest': rest.append((n, *tr.made.get(k, ('', ''))))
    res.update(peak=tr.peak, peak_ops=tr.peak_ops, kinds=kinds, comm=tr.comm, state=sorted(state, reverse=True), rest=sorted(rest, reverse=True), phase=tr.peak_phase, base=base, rank=rank, torch=torch.__version__,
               param_bytes=sum(_local(p).untyped_storage().nbytes() for p in model.parameters()))
    if cfg.get('strategy')=='ddp':
        res['buckets'] = [b.buffer().nbytes for b in model.reducer._get_zeros_like_grad_buckets()]
    return res

def run_ranks(cfgs, n=2, timeout=240):
    "Each of `cfgs` stepped on `n` real ranks (CPU, gloo, one thread each) under `torch.distributed.run`: `[[rank_step(cfg, r) for r in range(n)] for cfg in cfgs]`"
    with tempfile.TemporaryDirectory() as d:
        f = Path(d)/'cfgs.json'; f.write_text(json.dumps(cfgs))
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')])}
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(n), str(Path(__file__).parent/'rank_worker.py'),
                            str(f), d], capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode: raise RuntimeError(f"The {n} ranks failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        res = [json.loads((Path(d)/f'rank{i}.json').read_text()) for i in range(n)]
    return [[res[i][j] for i in range(n)] for j in range(len(cfgs))]

def fake_fsdp_step(cfg, world_size=2, rank=0):
    """`FSDPMemTracker`'s peak and kinds of `rank`'s FSDP2 step of `cfg` (the last rank's shards are smaller when a dim 0 does not divide), in this process, without ranks: a fake process group of `world_size`
    (`FakeStore`), the model, batch and optimizer on fake tensors. The device mesh is made before the fake mode: `DeviceMesh` reads its rank map's
    values (`tolist`, `aten._local_scalar_dense`), which fake tensors do not have"""
    import torch.distributed as dist, memory_refs as mr
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    dist.init_process_group('fake', store=FakeStore(), rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh('cpu', (world_size,))
        with FakeTensorMode():
            torch.manual_seed(0)
            model,xb,yb,lf = setup(cfg)
            model = _wrap(model, cfg, mesh)
            opt = _torch_opt(cfg.get('opt', 'adamw'), model.parameters())
            def step(prev=None):
                r = mr._fwd(model, xb, yb, lf, prev); r[1].backward(); opt.step(); opt.zero_grad(); return r
            r = None
            for _ in range(cfg.get('n_warm', 2)): r = step(r)
            ft = FSDPMemTracker(model, opt); ft.track_inputs((*xb, *yb))
            with ft: r = step(r)
        snap = ft.get_tracker_snapshot('peak')[torch.device('cpu')]
        return dict(fsdp_peak=snap['Total'], fsdp_kinds={str(k.value): v for k,v in snap.items() if k!='Total'})
    finally: dist.destroy_process_group()

def single_step(cfg):
    "`rank_step` of `cfg` in this process, without ranks or a process group (strategy 'none')"
    return rank_step({**cfg, 'strategy': 'none', 'sync_bn': False}, 0)
