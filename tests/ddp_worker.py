"""Worker of `test_callback_ddp.py`: one rank of 2-process CPU/gloo fits; rank 0 writes the results to argv[1].
fastai's `distrib_ctx` calls `torch.cuda.set_device` and initialises NCCL, and its `DistributedTrainer` needs `accelerate` (not installed here),
so on CPU we start gloo ourselves and wrap the model in `DistributedDataParallel` directly, as `DistributedTrainer` does in its `before_fit`;
each rank trains on its own shard of the data.
1. A `CostProfiler` fit: rank 0 gathers both ranks' tables.
2. Pairs: the same fit plain, profiled, with a checkpointed block, and both: losses, the block's forward calls, its recompute MACs."""
import sys, json, random, torch, torch.nn as nn, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.vision.all import Learner, DataLoaders, set_seed
from cnn_cost.callback import CostProfiler
from cnn_cost.plan import CheckpointBlocks

def _learner(rank, m):
    set_seed(rank, reproducible=True)
    x = torch.randn(96,3,12,12); y = (x.mean((1,2,3))>0).long()
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:16], bs=16, device='cpu')
    dls.train.rng = random.Random(rank)
    return Learner(dls, DDP(m), loss_func=nn.CrossEntropyLoss())

def profiled(rank):
    set_seed(0, reproducible=True)  # the same initial weights on both ranks
    m = nn.Sequential(nn.Conv2d(3,8,3,padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8,16,3,stride=2),
                      nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16,2))
    learn = _learner(rank, m)
    learn.add_cb(CostProfiler(skip=1, n_batches=3))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    if rank: return None
    s = learn.cost_profiler.summary()
    return dict(by_rank=s.by_rank.to_dict(orient='records'), df=s.df[['name','kind','time_ms','bwd_ms','time_ms_rank_min','time_ms_rank_max',
                'bwd_ms_rank_min','bwd_ms_rank_max']].to_dict(orient='records'), n_passes=s.n_passes, steps=s.steps.to_dict(orient='records'), n_ranks=s.n_ranks)

def pair(rank, ckpt, prof):
    set_seed(0, reproducible=True)
    m = nn.Sequential(nn.Conv2d(3,8,3,padding=1), nn.Sequential(nn.Conv2d(8,8,3,padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,2))
    learn = _learner(rank, m)
    n = [0]
    h = m[1][0].register_forward_hook(lambda mo,a,o: n.__setitem__(0, n[0]+(learn.training and torch.is_grad_enabled())))
    cbs = ([CheckpointBlocks(['1'])] if ckpt else []) + ([cp:=CostProfiler(skip=1, n_batches=2)] if prof else [])  # '1' of the module DDP wraps
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2, cbs=cbs)
    h.remove()
    left = any(mo._forward_hooks or mo._forward_pre_hooks or 'forward' in vars(mo) for mo in learn.model.modules())
    rec = None
    if prof and rank==0:
        df = learn.train_profile.summary().df
        inb = df.name.str.startswith(('1.', 'module.1.'))
        rec = dict(block=float(df.recompute_macs[inb].sum()), block_fwd=float(df.macs[inb].sum()), others=float(df.recompute_macs[~inb].sum()))
    return dict(losses=[float(l) for l in learn.recorder.losses], calls=n[0], left=left, rec=rec)

def main(out):
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    torch.set_num_threads(1)
    res = profiled(rank)
    pairs = {f'{int(c)}{int(p)}': pair(rank, c, p) for c,p in [(0,0), (0,1), (1,0), (1,1)]}
    if rank==0: json.dump(dict(res, pairs=pairs), open(out, 'w'))
    dist.destroy_process_group()

if __name__ == '__main__': main(sys.argv[1])
