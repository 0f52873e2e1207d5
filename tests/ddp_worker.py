"""Worker of `test_callback_ddp.py`: one rank of a 2-process CPU/gloo fit with `CostProfiler`; rank 0 writes the gathered summary to argv[1].
fastai's `distrib_ctx` calls `torch.cuda.set_device` and initialises NCCL, so on CPU we start gloo ourselves and wrap the model in
`DistributedDataParallel` directly; each rank trains on its own shard of the data."""
import sys, json, random, torch, torch.nn as nn, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.vision.all import Learner, DataLoaders, set_seed
from cnn_cost.callback import CostProfiler

def main(out):
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    torch.set_num_threads(1)
    set_seed(rank, reproducible=True)
    x = torch.randn(96,3,12,12); y = (x.mean((1,2,3))>0).long()
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:16], bs=16, device='cpu')
    set_seed(0, reproducible=True)  # the same initial weights on both ranks
    m = nn.Sequential(nn.Conv2d(3,8,3,padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8,16,3,stride=2),
                      nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16,2))
    learn = Learner(dls, DDP(m), loss_func=nn.CrossEntropyLoss(), cbs=CostProfiler(skip=1, n_batches=3))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    if rank==0:
        s = learn.cost_profiler.summary()
        json.dump(dict(by_rank=s.by_rank.to_dict(orient='records'), df=s.df[['name','kind','time_ms','bwd_ms','time_ms_rank_min','time_ms_rank_max',
                       'bwd_ms_rank_min','bwd_ms_rank_max']].to_dict(orient='records'), n_passes=s.n_passes, steps=s.steps.to_dict(orient='records'),
                       text=str(s)), open(out, 'w'))
    dist.destroy_process_group()

if __name__ == '__main__': main(sys.argv[1])
