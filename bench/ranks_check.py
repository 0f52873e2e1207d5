"""Per-rank memory, predicted against real CPU/gloo ranks (issue 27): `predict_memory(..., world_size=n, strategy=...)` for DDP (the
single-process prediction plus DDP's buckets) and FSDP2 (the step of a `fully_shard`ed copy on a fake process group), against each real rank's
peak of live tensor bytes (`tests/rank_refs.rank_step`: every storage an op makes, from before the model is built) and, for FSDP2, the bytes of
each collective's buffers. Corpus: torchvision's resnet18 and convnext_tiny, a small ViT, fastai's U-Net (resnet18 encoder) and AWD-LSTM
language model; FSDP2's units are the package's default (`inner_blocks`). One line per configuration and rank. About 10 minutes on 2 cores.
Run: `OMP_NUM_THREADS=1 python bench/ranks_check.py [n_ranks ...]`"""
import sys, torch, torch.nn as nn
from functools import partial
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parents[1]/'tests'))
import rank_refs as rr
from cnn_cost.memory import predict_memory
from fastai.optimizer import OptimWrapper

MODELS = [dict(model='resnet18', bs=8, size=64), dict(model='convnext_tiny', bs=4, size=32), dict(model='vit', bs=8, size=64),
          dict(model='unet', bs=4, size=64), dict(model='awd_lm', bs=8, size=32)]
DDP = [dict(m, opt='sgd', strategy='ddp') for m in MODELS if m['model']!='awd_lm']  # DDP on the LM: its unused-parameter check (tied weights) aside
FSDP = [dict(m, opt='adamw', strategy='fsdp', units='inner') for m in MODELS] + [dict(MODELS[2], opt='adamw', strategy='fsdp', units='inner', reshard=False)]

def pred(cfg, n):
    "Each rank's predicted step of `cfg` on `n` ranks"
    m,xb,yb,lf = rr.setup(cfg)
    of = rr.opt_func(cfg['opt']) or partial(OptimWrapper, opt=torch.optim.AdamW)
    if cfg['strategy']=='ddp': return predict_memory(m, xb, yb, lf, of, world_size=n, sync_bn=False)
    return predict_memory(m, xb, yb, lf, of, world_size=n, strategy='fsdp', reshard_after_forward=cfg.get('reshard', True))

def main(ns=(2, 4)):
    print(f"torch {torch.__version__}")
    for n in ns:
        for cfg,rs in zip(DDP+FSDP, rr.run_ranks(DDP+FSDP, n=n, timeout=1800)):
            name,p = ' '.join(f"{k}={v}" for k,v in cfg.items()),pred(cfg, n)
            for r in rs:
                if 'error' in r: print(f"{n} ranks, {name}, rank {r['rank']}: real run failed: {r['error'][:200]}"); continue
                mesh = sum(b for b,op,ph in r['state'] if (op, ph)==('aten.arange.default', 'init'))  # the device mesh's host tensors
                if cfg['strategy']=='ddp':
                    print(f"{n} ranks, {name}, rank {r['rank']}: predicted {p.peak}..{p.peak_max} real {r['peak']} diff {r['peak']-p.peak} | buckets equal {p.buckets==r['buckets']}")
                else:
                    print(f"{n} ranks, {name}, rank {r['rank']}: predicted {p.peak} real {r['peak']} (mesh {mesh}) diff {r['peak']-mesh-p.peak} | "
                          f"optimizer state predicted {p.at_peak['optimizer state']} real {r['kinds']['opt']} | collectives equal {p.comm==r['comm']} {p.comm}")

if __name__ == '__main__': main(tuple(int(a) for a in sys.argv[1:]) or (2, 4))
