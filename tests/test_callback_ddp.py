"Two processes on CPU/gloo, each profiling its own batches of a `DistributedDataParallel` model; rank 0 gathers both ranks' tables"
import json, subprocess, sys, os
from pathlib import Path

def test_two_rank_gloo(tmp_path):
    out = tmp_path/'rank0.json'
    env = {**os.environ, 'OMP_NUM_THREADS':'1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                        str(Path(__file__).parent/'ddp_worker.py'), str(out)], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode==0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    by_rank = d['by_rank']
    assert {o['rank'] for o in by_rank}=={0,1}
    names = [o['name'] for o in d['df'] if o['kind']=='leaf']
    for rk in (0,1): assert sorted(o['name'] for o in by_rank if o['rank']==rk and o['name'] in names)==sorted(names)
    assert d['n_passes']==6 and {o['rank'] for o in d['steps']}=={0,1}
    for o in d['df']:
        if o['kind']!='leaf': continue
        assert o['bwd_ms']>0 and o['time_ms_rank_min'] <= o['time_ms_rank_max'] and o['bwd_ms_rank_min'] <= o['bwd_ms_rank_max']
        mine = sorted(b['time_ms'] for b in by_rank if b['name']==o['name'])
        assert mine[0]==o['time_ms_rank_min'] and mine[-1]==o['time_ms_rank_max']
    assert '2 ranks' in d['text']
