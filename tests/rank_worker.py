"""One rank of `rank_refs.run_ranks` under `torch.distributed.run`: argv[1] a JSON list of step configurations, argv[2] the folder where this
rank writes `rank{RANK}.json`, the list of `rank_refs.rank_step` results (or, for a configuration that fails, its `error`)"""
import sys, json, datetime, traceback, torch, torch.distributed as dist
from pathlib import Path
from rank_refs import rank_step

def main(cfgs, out):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=120))
    rank,res = dist.get_rank(),[]
    try:
        for cfg in json.loads(Path(cfgs).read_text()):
            try: res.append(rank_step(cfg, rank))
            except Exception as e: res.append(dict(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:]))
            dist.barrier()
    finally:
        (Path(out)/f'rank{rank}.json').write_text(json.dumps(res))
        dist.destroy_process_group()

if __name__ == '__main__': main(*sys.argv[1:3])
