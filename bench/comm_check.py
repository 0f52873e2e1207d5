"""Time in collectives of `CostProfiler` on 2 CPU/gloo ranks against `torch.profiler` (issue 27, item 5). Each run is `tests/ddp_worker.py` under
`torch.distributed.run`: a DDP fit through fastai's `distrib_ctx(cpu=True)` and an FSDP2 fit through `learn.shard`, each with `torch.profiler`
over one profiled training batch of every rank. Per run and job, on rank 0's reference batch: the profile's `comm_calls` (Python calls of
`torch.distributed`'s collectives) against the profiler's c10d ops, and the profile's `comm` (ms the rank spent in them, DDP's wait after its last
gradient included) against the ms in which gloo's threads ran a collective (the union of their `gloo:` events). Writes bench/out/comm_check.md.
Run: `python bench/comm_check.py [runs]` (default 5; about 25 s a run on 2 cores)"""
import sys, os, json, subprocess, tempfile, datetime, numpy as np, torch
from pathlib import Path

root = Path(__file__).parents[1]

def one_run():
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)/'rank0.json'
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(root/'tests'/'ddp_worker.py'), str(out)],
                           capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
        if r.returncode: raise RuntimeError(r.stderr[-2000:])
        d = json.loads(out.read_text())
    res = {}
    for job,D in [('DDP (fastai `distrib_ctx`)', d), ('FSDP2 (`learn.shard`)', d['fsdp'])]:
        ref = D['ref']; mine = next(o for o in D['steps'] if o['rank']==0 and o['iter']==ref['iter'])
        res[job] = dict(calls=mine['comm_calls'], ops=ref['ops'], comm=mine['comm'], gloo=ref['gloo_ms'], fwd=mine['comm_fwd'], bwd=mine['comm_bwd'])
    return res

def main(n=5):
    print(f"torch {torch.__version__}")
    runs = []
    for i in range(n):
        runs.append(one_run())
        print(i, {k: (v['calls'], sum(v['ops'].values()), round(v['comm'], 2), round(v['gloo'], 2)) for k,v in runs[-1].items()}, flush=True)
    md = [f"Measured {datetime.date.today()}, CPU (2 cores), gloo, torch {torch.__version__}, {n} runs of `tests/ddp_worker.py` on 2 ranks: a small CNN "
          "with BatchNorm under DDP, `rank_refs`' tiny ViT (two blocks and the root as units) under FSDP2. `torch.profiler` records one profiled batch "
          "of rank 0 beside the profile; \"gloo ms\" is the time in which gloo's threads ran a collective (the union of their `gloo:` events), \"comm ms\" "
          "the profile's time in collectives on that batch. The two processes share the two cores, so every run is disturbed: these are how the "
          "measures relate, not quiet timings.", "",
          "| job | profile's calls a step | profiler's c10d ops on the batch | comm ms, median (min–max) | gloo ms, median (min–max) | gloo / comm, median (min–max) |",
          "|---|---|---|---|---|---|"]
    for job in runs[0]:
        v = [r[job] for r in runs]
        calls,ops = sorted({x['calls'] for x in v}),sorted({', '.join(f"{k.removeprefix('c10d::')} {c}" for k,c in sorted(x['ops'].items())) for x in v})
        c,g = np.array([x['comm'] for x in v]),np.array([x['gloo'] for x in v])
        f = lambda a, p=2: f"{np.median(a):.{p}f} ({a.min():.{p}f}–{a.max():.{p}f})"
        md.append(f"| {job} | {', '.join(f'{x:.0f}' for x in calls)} | {'; '.join(ops)} | {f(c)} | {f(g)} | {f(g/c)} |")
    md += ["", "- FSDP2: the profile's calls equal the profiler's all-gathers and reduce-scatters one for one (5 all-gathers: the root's and each block's "
           "in the forward, each block's again before its backward; 3 reduce-scatters). DDP: one Python call a step, `_broadcast_coalesced` of the "
           "BatchNorm buffers (the profiler sees its 2 broadcasts); the gradient all-reduce is the C++ reducer's (`allreduce_`), timed as the wait "
           "from the last gradient to the backward's end.",
           "- gloo's threads run each collective inside the time the rank waits for it, so gloo ms lies at or below comm ms, less by the launch, the "
           "copies in and out and the wait for the other rank; above it only where a gloo thread, descheduled on the loaded cores, records its event's "
           "end after it has let the rank go (`tests/test_callback_ddp.py` allows 1.5 x + 0.5 ms for that)."]
    o = Path(__file__).parent/'out'; o.mkdir(exist_ok=True)
    (o/'comm_check.md').write_text('\n'.join(md)+'\n')
    print('\n'.join(md))

if __name__ == '__main__': main(*(int(a) for a in sys.argv[1:]))
