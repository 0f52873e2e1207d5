"""Per-rank memory, predicted against real CPU/gloo ranks (issue 27): `predict_memory(..., world_size=n, strategy=...)` for DDP (the
single-process prediction plus DDP's buckets, or with `gradient_as_bucket_view=True` the buckets as the gradients) and FSDP2 (the step of a `fully_shard`ed copy on a fake process group), against each real rank's
peak of live tensor bytes (`tests/rank_refs.rank_step`: every storage an op makes, from before the model is built) and, for FSDP2, the bytes of
each collective's buffers. Corpus: torchvision's resnet18 and convnext_tiny, a small ViT, fastai's U-Net (resnet18 encoder) and AWD-LSTM
language model; FSDP2's units are the package's default (`inner_blocks`). Prints one line per configuration and rank, and writes
bench/out/ranks_check.md for BENCHMARKS.md. A few minutes on 2 cores. Run: `python bench/ranks_check.py [n_ranks ...]` (default 2 4)"""
import sys, json, datetime, torch, torch.nn as nn
from functools import partial
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parents[1]/'tests'))
import rank_refs as rr
from cnn_cost.memory import predict_memory
from fastai.optimizer import OptimWrapper
from torch.distributed.fsdp import MixedPrecisionPolicy

MODELS = [dict(model='resnet18', bs=8, size=64), dict(model='convnext_tiny', bs=4, size=32), dict(model='vit', bs=8, size=64),
          dict(model='unet', bs=4, size=64), dict(model='awd_lm', bs=8, size=32)]
DDP = [dict(m, opt='sgd', strategy='ddp') for m in MODELS if m['model']!='awd_lm']  # the LM's tied weights: DDP's unused-parameter check aside
DDP += [dict(m, opt='adamw', strategy='ddp', view=True) for m in MODELS if m['model']!='awd_lm']  # gradients as views of the buckets (a torch optimizer)
FSDP = [dict(m, opt='adamw', strategy='fsdp', units='inner') for m in MODELS] + [dict(MODELS[2], opt='adamw', strategy='fsdp', units='inner', reshard=False),
        dict(MODELS[2], opt='adamw', strategy='fsdp', units='inner', mp='bfloat16')]

def pred(cfg, n):
    "Each rank's predicted step of `cfg` on `n` ranks"
    m,xb,yb,lf = rr.setup(cfg)
    of = rr.opt_func(cfg['opt']) or partial(OptimWrapper, opt=torch.optim.AdamW)
    if cfg['strategy']=='ddp': return predict_memory(m, xb, yb, lf, of, world_size=n, sync_bn=False, gradient_as_bucket_view=cfg.get('view'))
    mp = MixedPrecisionPolicy(param_dtype=getattr(torch, cfg['mp']), reduce_dtype=torch.float32) if cfg.get('mp') else None
    return predict_memory(m, xb, yb, lf, of, world_size=n, strategy='fsdp', reshard_after_forward=cfg.get('reshard', True), mp_policy=mp)

def _label(cfg):
    s = ('DDP, bucket views (AdamW)' if cfg.get('view') else 'DDP (SGD, momentum)') if cfg['strategy']=='ddp' else 'FSDP2 (AdamW' + (', no reshard' if cfg.get('reshard') is False else '') + (', bf16 parameters' if cfg.get('mp') else '') + ')'
    return f"{cfg['model']}, {cfg['bs']} x {cfg['size']}{'' if cfg['model']=='awd_lm' else ' px'}", s

def main(ns=(2, 4)):
    print(f"torch {torch.__version__}")
    rows = []
    for n in ns:
        for cfg,rs in zip(DDP+FSDP, rr.run_ranks(DDP+FSDP, n=n, timeout=1800)):
            p,row = pred(cfg, n),dict(n=n, cfg=cfg, diffs=[], opt=[], equal=[])
            row['peak'] = p.peak
            for r in rs:
                if 'error' in r: print(f"{n} ranks, {cfg}, rank {r['rank']}: real run failed: {r['error'][:200]}"); row['diffs'].append(None); continue
                mesh = sum(b for b,op,ph in r['state'] if (op, ph)==('aten.arange.default', 'init'))  # the device mesh's host tensors
                d = r['peak_ops']-mesh-p.peak  # without gloo's copy of a running reduce-scatter's input (`rank_refs.StorageTracker.peak_ops`)
                eq = p.buckets==r['buckets'] if cfg['strategy']=='ddp' else p.comm==r['comm']
                row['diffs'].append(d); row['opt'].append(r['kinds']['opt']-p.at_peak['optimizer state']); row['equal'].append(eq)
                print(f"{n} ranks, {cfg}, rank {r['rank']}: predicted {p.peak} real {r['peak']} (mesh {mesh}) diff {d} | optimizer state real-predicted "
                      f"{row['opt'][-1]} | {'buckets' if cfg['strategy']=='ddp' else 'collectives'} equal {eq}", flush=True)
            rows.append(row)
    md = [f"Measured {datetime.date.today()}, CPU, gloo, torch {torch.__version__}. Each configuration's training step runs for real on " + ' and '.join(map(str, ns)) +
          " processes (`torch.distributed.run`), each rank under a dispatch mode that sees every storage an op makes from before the model is built "
          "(`tests/rank_refs.py`); the prediction runs in one process on fake tensors: for DDP the single-process step plus DDP's buckets (`sync_bn=False`; with bucket views, the buckets as the gradients), "
          "for FSDP2 the step of a `fully_shard`ed copy on a fake process group, its units `inner_blocks(model)`. \"real − predicted\" is each rank's peak "
          "of live tensor bytes minus the prediction's `peak`, less, for FSDP2, the device mesh's host tensors (4 bytes per rank, one per unit, made with "
          "the mesh, outside the predicted step) and what gloo allocates outside PyTorch's ops (its copy of a running reduce-scatter's input, which NCCL "
          "does not make). \"Collectives\": for DDP the `Reducer`'s buckets equal `MemorySummary.buckets`; for FSDP2 the bytes of every all-gather output "
          "and reduce-scatter input of the real step equal `MemorySummary.comm`.", "",
          "| ranks | model, batch per rank | strategy | predicted peak per rank, B | real − predicted, each rank, B | collectives equal |", "|---|---|---|---|---|---|"]
    for r in rows:
        m,s = _label(r['cfg'])
        md.append(f"| {r['n']} | {m} | {s} | {r['peak']:,} | {', '.join('failed' if d is None else f'{d:+,}' if d else '0' for d in r['diffs'])} | {'yes' if all(r['equal']) else 'no'} |")
    exact = sum(d==0 for r in rows for d in r['diffs'])
    last = [(r, d) for r in rows for d,o in zip(r['diffs'], r['opt']) if d and d==o]
    other = [(r, i, d) for r in rows for i,(d,o) in enumerate(zip(r['diffs'], r['opt'])) if d and d!=o]
    md += ["", f"- {exact} of {sum(len(r['diffs']) for r in rows)} ranks exact. The prediction is rank 0's step: " +
           (f"{len(last)} rank{'s'*(len(last)>1)} held less by exactly its smaller optimizer state (FSDP2 pads a parameter's shards when dim 0 does not divide by the world size, not its optimizer state): "
            + ', '.join(sorted({f'{d:+,}' for _,d in last})) + " B." if last else "no rank differs by its optimizer state.")]
    md += [f"- {_label(r['cfg'])[0]}, {_label(r['cfg'])[1]}, {r['n']} ranks, rank {i}: {d:+,} B ({d/r['peak']:+.2%}), of which optimizer state {r['opt'][i]:+,} B" for r,i,d in other]
    if other: md.append("- A rank above the prediction holds what the collectives' backend keeps outside PyTorch's allocations for a while: gloo's thread dropping a buffer "
                        "late (varies from run to run), or, with bf16 parameters, gloo's fp32 reduce-scatter.")
    o = Path(__file__).parent/'out'; o.mkdir(exist_ok=True)
    (o/'ranks_check.md').write_text('\n'.join(md)+'\n')

if __name__ == '__main__': main(tuple(int(a) for a in sys.argv[1:]) or (2, 4))
