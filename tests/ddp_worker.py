"""Worker of `test_callback_ddp.py`: one rank of 2-process CPU/gloo fits; rank 0 writes the results to argv[1].
Each fit runs in fastai's `learn.distrib_ctx(sync_bn=False, cpu=True)`: its `DistributedTrainer` (through `accelerate`, which starts gloo with `cpu=True`) wraps the
model in `DistributedDataParallel` in `before_fit` and the loaders in `DistributedDL` (here `CPUDistributedDL`, see below), so each rank trains on its own shard of the data.
`sync_bn=False`: `SyncBatchNorm` does not run on the CPU.
1. A `CostProfiler` fit: rank 0 gathers both ranks' tables.
2. Pairs: the same fit plain, profiled, with a checkpointed block, and both: losses, the block's forward calls, its recompute MACs.
3. A `CostProfiler` fit of a model sharded with `learn.shard` (FSDP2).
In 1 and 3 `torch.profiler` also records one profiled batch: its collectives (c10d ops) and gloo's own time running them, the reference for the
profile's time in collectives"""
import sys, json, collections, torch, torch.nn as nn, torch.distributed as dist
from torch.profiler import profile, ProfilerActivity
from fastai.vision.all import Learner, DataLoaders, Callback, set_seed
from fastai.torch_core import rank_distrib
from fastai.distributed import DistributedDL, teardown_distrib  # and `Learner.distrib_ctx`
from cnn_cost.callback import CostProfiler
from cnn_cost.plan import CheckpointBlocks

class CPUDistributedDL(DistributedDL):
    "fastai's `DistributedDL` with its shuffled indices broadcast from rank 0 over gloo: fastai's own puts them on CUDA (NCCL takes CUDA tensors only)"
    def _broadcast(self, t, rank): t = torch.tensor(t, dtype=torch.long); dist.broadcast(t, rank); return t.tolist()

def _learner(rank, m):
    set_seed(0, reproducible=True)  # the same data on both ranks: `DistributedDL` gives each its shard
    x = torch.randn(192,3,12,12); y = (x.mean((1,2,3))>0).long()
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:32], bs=16, device='cpu')
    learn = Learner(dls, m, loss_func=nn.CrossEntropyLoss())
    learn.dls.loaders = [CPUDistributedDL(dl) for dl in learn.dls.loaders]  # `DistributedTrainer` keeps a loader that is a `DistributedDL` already
    return learn

class _Wrapped(Callback):
    "Whether every training batch ran the model wrapped in `DistributedDataParallel` (by `DistributedTrainer`, order 11, in `before_fit`)"
    order,ddp = 12,None
    def before_batch(self):
        w = isinstance(self.learn.model, nn.parallel.DistributedDataParallel); self.ddp = w if self.ddp is None else self.ddp and w

class _Reference(Callback):
    "`torch.profiler` over training batch `at` (order 4: around `CostProfiler`'s own events): per c10d op its calls, and the ms in which gloo's threads ran a collective"
    order = 4
    def __init__(self, at=2): self.at,self.res,self._p = at,None,None
    def before_batch(self):
        if self.learn.training and self.learn.train_iter==self.at: self._p = profile(activities=[ProfilerActivity.CPU]); self._p.__enter__()
    def after_batch(self):
        if self._p is None: return
        p,self._p = self._p,None; p.__exit__(None, None, None)
        ev = p.events()
        self.res = dict(iter=self.at, ops=collections.Counter(e.name for e in ev if e.name.startswith('c10d::')),
                        gloo_ms=_union_ms([(e.time_range.start, e.time_range.end) for e in ev if e.name.startswith('gloo:')]))

def _union_ms(spans):
    "ms (from µs) that the `spans` cover together: gloo runs some collectives at once on threads of its own"
    res,end = 0.,-float('inf')
    for a,b in sorted(spans):
        if b>end: res += b-max(a, end); end = b
    return res/1e3

def _fit(learn, cbs=None):
    with learn.no_bar(), learn.no_logging(), learn.distrib_ctx(sync_bn=False, cpu=True): learn.fit(1, 1e-2, cbs=list(cbs or [])+[w:=_Wrapped()])
    return w.ddp

def profiled(rank):
    set_seed(0, reproducible=True)  # the same initial weights on both ranks
    m = nn.Sequential(nn.Conv2d(3,8,3,padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8,16,3,stride=2),
                      nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16,2))
    learn = _learner(rank, m)
    learn.add_cb(CostProfiler(skip=1, n_batches=3))
    ddp = _fit(learn, [ref:=_Reference()])
    if rank: return None
    s = learn.cost_profiler.summary()
    return dict(by_rank=s.by_rank.to_dict(orient='records'), df=s.df[['name','kind','time_ms','bwd_ms','time_ms_rank_min','time_ms_rank_max',
                'bwd_ms_rank_min','bwd_ms_rank_max']].to_dict(orient='records'), n_passes=s.n_passes, steps=s.steps.to_dict(orient='records'), n_ranks=s.n_ranks, ddp=ddp,
                ref=ref.res)

def sharded(rank):
    "A `CostProfiler` fit of `rank_refs`' tiny ViT sharded by `learn.shard` (its two blocks and the root); rank 0 returns the steps and the reference"
    import rank_refs as rr, cnn_cost.all  # `Learner.shard`
    if not dist.is_initialized(): dist.init_process_group('gloo')  # `distrib_ctx` tore its group down
    set_seed(0, reproducible=True)
    x = torch.randn(96,3,32,32); y = torch.randint(0, 10, (96,))
    learn = Learner(DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:16], bs=8, shuffle=False, device='cpu'), rr.make_model('tiny_vit'),
                    loss_func=nn.CrossEntropyLoss()).shard()
    learn.add_cb(CostProfiler(skip=1, n_batches=3))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=(ref:=_Reference()))
    if rank: return None
    s = learn.cost_profiler.summary()
    return dict(steps=s.steps.to_dict(orient='records'), ref=ref.res, facts=s.facts())

def pair(rank, ckpt, prof):
    set_seed(0, reproducible=True)
    m = nn.Sequential(nn.Conv2d(3,8,3,padding=1), nn.Sequential(nn.Conv2d(8,8,3,padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,2))
    learn = _learner(rank, m)
    n = [0]
    h = m[1][0].register_forward_hook(lambda mo,a,o: n.__setitem__(0, n[0]+(learn.training and torch.is_grad_enabled())))
    cbs = ([CheckpointBlocks(['1'])] if ckpt else []) + ([cp:=CostProfiler(skip=1, n_batches=2)] if prof else [])  # '1' of the module DDP wraps
    ddp = _fit(learn, cbs)
    assert not isinstance(learn.model, nn.parallel.DistributedDataParallel)  # `DistributedTrainer` unwrapped it in `after_fit`
    h.remove()
    left = any(mo._forward_hooks or mo._forward_pre_hooks or 'forward' in vars(mo) for mo in learn.model.modules())
    rec = None
    if prof and rank==0:
        df = learn.train_profile.summary().df
        inb = df.name.str.startswith(('1.', 'module.1.'))
        rec = dict(block=float(df.recompute_macs[inb].sum()), block_fwd=float(df.macs[inb].sum()), others=float(df.recompute_macs[~inb].sum()))
    return dict(losses=[float(l) for l in learn.recorder.losses], calls=n[0], left=left, rec=rec, ddp=ddp)

def main(out):
    rank = rank_distrib()
    torch.set_num_threads(1)
    res = profiled(rank)
    pairs = {f'{int(c)}{int(p)}': pair(rank, c, p) for c,p in [(0,0), (0,1), (1,0), (1,1)]}
    fsdp = sharded(rank)
    if rank==0: json.dump(dict(res, pairs=pairs, fsdp=fsdp), open(out, 'w'))
    dist.destroy_process_group()

if __name__ == '__main__': main(sys.argv[1])
