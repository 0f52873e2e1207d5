"""Per-rank memory, predicted against real CPU/gloo ranks (issue 27): DDP (`predict_memory(..., world_size=n)`: the single-process prediction plus
DDP's buckets) and FSDP2 (`FSDPMemTracker` in one process with a fake process group, `tests/rank_refs.fake_fsdp_step`), for torchvision's resnet18
and a small ViT, on 2 and 4 ranks. Prints one line per configuration and rank: predicted and real bytes. Takes a few minutes on 2 cores.
Run: `OMP_NUM_THREADS=1 python bench/ranks_check.py [n_ranks ...]`"""
import sys, torch, torch.nn as nn
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parents[1]/'tests'))
import rank_refs as rr
from cnn_cost.memory import predict_memory

DDP = [dict(model='resnet18', bs=8, size=64, opt='sgd', strategy='ddp'), dict(model='vit', bs=8, size=64, opt='adam', strategy='ddp')]
FSDP = [dict(model='vit', bs=8, size=64, opt='adamw', strategy='fsdp', reshard=r) for r in (True, False)] + \
       [dict(model='vit', bs=8, size=64, opt='adamw', strategy='fsdp', mp='bfloat16')]

def ddp_pred(cfg, n):
    "Each rank's predicted step of `cfg` on `n` ranks, and the single-process one"
    m = rr.make_model(cfg['model']); xb,yb = rr.batch(cfg['bs'], cfg['size']); lf,of = nn.CrossEntropyLoss(),rr.opt_func(cfg['opt'])
    return predict_memory(m, xb, yb, lf, of, world_size=n, bucket_cap_mb=cfg.get('bucket_cap_mb'), sync_bn=False),predict_memory(m, xb, yb, lf, of)

def main(ns=(2, 4)):
    print(f"torch {torch.__version__}")
    for n in ns:
        for cfg,rs in zip(DDP+FSDP, rr.run_ranks(DDP+FSDP, n=n, timeout=900)):
            name = ' '.join(f"{k}={v}" for k,v in cfg.items())
            if cfg['strategy']=='ddp':
                (p,p1),one = ddp_pred(cfg, n),rr.single_step(cfg)
                for r in rs: print(f"{n} ranks, {name}, rank {r['rank']}: predicted {p.peak}..{p.peak_max} real {r['peak']} diff {r['peak']-p.peak} | single real {one['peak']} "
                                   f"predicted {p1.peak} | buckets predicted {p.buckets} real {r['buckets']}")
            else:
                for r in rs:
                    f = rr.fake_fsdp_step(cfg, n, r['rank'])
                    print(f"{n} ranks, {name}, rank {r['rank']}: fake FSDPMemTracker {f['fsdp_peak']} real FSDPMemTracker {r['fsdp_peak']} "
                          f"diff {r['fsdp_peak']-f['fsdp_peak']} | real storages {r['peak']} (+{r['peak']-r['fsdp_peak']}, before the step: {r['kinds']['state']})")

if __name__ == '__main__': main(tuple(int(a) for a in sys.argv[1:]) or (2, 4))
