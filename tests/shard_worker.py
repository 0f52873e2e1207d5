"""One rank of `test_ranks.py`'s check of `learn.shard` (2 CPU/gloo processes under `torch.distributed.run`): a fastai `Learner` of a small ViT
sharded with `learn.shard(...)` (FSDP2), one epoch of `fit`, then one more training batch through fastai's loop under `rank_refs.StorageTracker`.
Writes `rank{RANK}.json` into argv[1]: the batch's peak of live tensor bytes (`peak`; `peak_ops` without gloo's copy of a reduce-scatter input),
the rank's parameter, gradient and optimizer-state bytes (`state`), the collectives' buffers, and on rank 0 the full weights after the epoch"""
import sys, json, torch, torch.nn as nn, torch.distributed as dist
from pathlib import Path
from functools import partial
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.optimizer import SGD
from torch.distributed.fsdp import FSDPModule
from fastai.torch_core import set_seed
import cnn_cost.all  # `Learner.shard`
import rank_refs as rr, memory_refs as mr

def data(n=64):
    "The same `n` samples on every rank: 3 x 32 x 32 images and 10 classes"
    g = torch.Generator().manual_seed(0)
    return [(x, y) for x,y in zip(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))]

def learner(ds, bs=8):
    "A `Learner` of `rank_refs`' tiny ViT on `ds`, unshuffled, fastai's SGD with momentum"
    set_seed(0)
    return Learner(DataLoaders.from_dsets(ds, ds[:16], bs=bs, shuffle=False, device='cpu'), rr.make_model('tiny_vit'), loss_func=nn.CrossEntropyLoss(),
                   opt_func=partial(SGD, mom=0.9))

def main(out, reshard='1'):
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    rank,ds = dist.get_rank(),data()
    tr = rr.StorageTracker()
    with tr:
        learn = learner(ds).shard(reshard_after_forward=reshard=='1')
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
        for m in learn.model.modules():  # the validation's forward leaves the parameters gathered when not resharded after it: each rank's shards again
            if isinstance(m, FSDPModule): m.reshard()
        weights = [p.full_tensor().tolist() for p in learn.model.parameters()]  # a collective: every rank takes part
        b = learn.dls.train.one_batch()
        mr._batch_quiet(learn, b)  # a training batch first: the tracked one starts where a training step leaves each rank, not an evaluation
        base = tr.cur; tr.reset()
        mr._batch_quiet(learn, b)
        ps = list(learn.model.parameters())
        state = dict(param=sum(rr._local(p).untyped_storage().nbytes() for p in ps),
                     grad=sum(rr._local(p.grad).untyped_storage().nbytes() for p in ps if p.grad is not None),
                     opt=sum(rr._local(t).untyped_storage().nbytes() for t in mr._opt_tensors(learn.opt)))
    res = dict(rank=rank, peak=tr.peak, peak_ops=tr.peak_ops, base=base, state=state, comm=tr.comm, phase=tr.peak_phase, weights=weights if rank==0 else None)
    (Path(out)/f'rank{rank}.json').write_text(json.dumps(res))
    dist.destroy_process_group()

if __name__ == '__main__': main(*sys.argv[1:])
