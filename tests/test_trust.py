"Timings a reader can trust (issue 18): a disturbed CPU is detected and said, adaptive rounds, shapes printed whole."
import os, sys, time, subprocess, contextlib, pytest, torch, torch.nn as nn
from cnn_cost.all import *
from cnn_cost.learner import n_min_repeat, n_paired
from cnn_cost.timing import CPUClock, cpu_wait_max, run_queue_ns
import cnn_cost.timing, cnn_cost.learner

linux = pytest.mark.skipif(run_queue_ns() is None or not hasattr(os, 'sched_setaffinity'), reason='needs /proc/self/task/*/schedstat and CPU affinity (Linux)')

def _cnn(): return nn.Sequential(nn.Conv2d(3,16,3,padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16,16,3,padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16,10))
X = torch.randn(8,3,32,32)

@contextlib.contextmanager
def one_core(n_busy=0):
    "This process and torch on one core (one thread), with `n_busy` processes spinning on that same core: a CPU the test controls"
    old,nt,core = os.sched_getaffinity(0),torch.get_num_threads(),max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core}); torch.set_num_threads(1)
    ps = [subprocess.Popen([sys.executable, '-c', f'import os,time\nos.sched_setaffinity(0,{{{core}}})\nt=time.time()\nwhile time.time()-t<60: pass'])
          for _ in range(n_busy)]
    try:
        if ps: time.sleep(0.3)  # the spinners are running
        yield core
    finally:
        for p in ps: p.kill(); p.wait()
        os.sched_setaffinity(0, old); torch.set_num_threads(nt)

def _core_ticks(core):
    "(busy, total) clock ticks of `core` so far (/proc/stat), and this process's own CPU ticks"
    f = next(l.split() for l in open('/proc/stat') if l.startswith(f'cpu{core} '))
    v = list(map(int, f[1:9])); own = os.times()
    return v[0]+v[1]+v[2]+v[5]+v[6]+v[7], sum(v), (own.user+own.system)*os.sysconf('SC_CLK_TCK')

@linux
def test_busy_cpu_flagged_quiet_one_not():
    "Processes competing for the core make the totals say the row times are disturbed, with the share; the same run alone waits less"
    with one_core() as core:
        a = _core_ticks(core); quiet = model_cost(_cnn(), X, n_repeat=10); b = _core_ticks(core)
    with one_core(n_busy=3): busy = model_cost(_cnn(), X, n_repeat=10)
    assert busy.cpu_wait > cpu_wait_max and busy.cpu_wait > quiet.cpu_wait
    assert busy.disturbed and any(f'waited {100*busy.cpu_wait:.0f}%' in n for n in busy.notes)
    assert quiet.disturbed == (quiet.cpu_wait > cpu_wait_max)
    others = (b[0]-a[0]-(b[2]-a[2]))/max(b[1]-a[1], 1)  # what other processes ran on the core during the quiet run
    if others > 0.02: pytest.skip(f"other processes used {100*others:.0f}% of the core during the quiet run: it was not quiet (busy run flagged as it should)")
    assert quiet.cpu_wait < cpu_wait_max and not quiet.disturbed

@linux
def test_busy_cpu_flagged_in_training():
    "`CostProfiler`: the same reading over each profiled batch"
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    x = torch.randn(64,3,32,32); y = (x.mean((1,2,3))>0).long()
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:16], bs=16, device='cpu')
    learn = Learner(dls, _cnn(), loss_func=nn.CrossEntropyLoss())
    with one_core(n_busy=3), learn.no_bar(), learn.no_logging(): learn.fit(1, cbs=CostProfiler(skip=1))
    s = learn.train_profile.summary()
    assert s.cpu_wait > cpu_wait_max and s.disturbed

def test_unavailable_off_linux(monkeypatch):
    "Without schedstat the totals say the check is unavailable: never quiet, never disturbed"
    monkeypatch.setattr(cnn_cost.timing, 'run_queue_ns', lambda: None)
    s = model_cost(_cnn(), X, n_repeat=2)
    assert s.cpu_wait != s.cpu_wait and not s.disturbed and any(n.startswith('CPU run-queue wait: unavailable') for n in s.notes)

class FakeClock(CPUClock):
    "A clock that moves 1 ms per stamp: every round times the same"
    def __init__(self): self.t = 0
    def stamp(self): self.t += 1_000_000; return self.t

def test_adaptive_rounds_stop_when_settled(monkeypatch):
    monkeypatch.setattr(cnn_cost.learner, 'clock_for', lambda dev: FakeClock())
    monkeypatch.setattr(cnn_cost.timing, 'run_queue_ns', lambda: None)  # the fake clock's rounds are quiet whatever the machine does
    s = model_cost(_cnn(), X)
    assert len(s.hooked_ms) == n_min_repeat and len(s.plain_ms) == n_paired   # identical rounds settle at once
    assert s.n_passes == 2 + n_min_repeat + n_paired   # counting, then the unhooked op pass (`plain_ops`, names only: the path is the same)
    assert s.hook_overhead == s.hooked_ms[0]/s.plain_ms[0]   # paired over the rounds that ran both
    assert (s.df.time_ms_se == 0).all() and s.precision == 0 and not s.loose

class Jitter(nn.Module):
    def __init__(self): super().__init__(); self.i = 0
    def forward(self, x): self.i += 1; time.sleep((0.002, 0.03, 0.06)[self.i%3]); return x   # 2, 30, 60 ms in turn (and more under load): never within 2.5%

def test_adaptive_rounds_capped(monkeypatch):
    monkeypatch.setattr(cnn_cost.timing, 'run_queue_ns', lambda: None)  # the precision lines are stated only for undisturbed passes: not at the mercy of the machine here
    s = model_cost(nn.Sequential(nn.Linear(4,4), Jitter()), torch.randn(2,4), max_repeat=7)
    assert len(s.hooked_ms) == 7 and len(s.plain_ms) == n_paired and s.n_passes == 2 + 7 + n_paired
    j = s.df.set_index('name').loc['1']   # the jittering row: its median known only roughly, and the totals name it
    assert j.time_ms_se > 0.05*j.time_ms and '1' in s.loose
    f = model_cost(nn.Sequential(nn.Linear(4,4), Jitter()), torch.randn(2,4), n_repeat=5, n_warmup=0)   # a fixed count, as before
    assert len(f.hooked_ms) == len(f.plain_ms) == 5 and f.n_passes == 2 + 10
    m = nn.Sequential(nn.Linear(2,2), nn.BatchNorm1d(2)).train(); w = m[0].weight.clone()
    for kw,msg in [(dict(n_repeat=0), 'n_repeat must be an int of at least 1'), (dict(n_repeat=1.5), 'n_repeat must be an int'),
                   (dict(max_repeat=0), 'max_repeat must be an int of at least 4'), (dict(n_warmup=-1), 'n_warmup must be an int of at least 0'),
                   (dict(precision=-1), 'precision is a relative standard error')]:
        with pytest.raises(ValueError, match=msg): model_cost(m, torch.randn(3,2), **kw)
        assert m.training and not any(x._forward_hooks or x._forward_pre_hooks for x in m.modules()) and torch.equal(m[0].weight, w)

def test_long_shapes_print_whole():
    "A video-sized output shape prints whole; the shape column widens to it, the rest keeps fastai's widths"
    s = model_cost(nn.Sequential(nn.Conv3d(1,1,1), nn.ReLU()), torch.randn(1,1,2,100,100), n_repeat=1)
    lines = str(s).splitlines()
    shape = '1 x 1 x 2 x 100 x 100'
    assert any(l.strip()==shape for l in lines), lines[:8]
    head = lines[2]
    assert head.index('Param #') - head.index('Output Shape') == len(shape)+1 and lines[4].index(shape) == head.index('Output Shape')
    assert len(lines[1]) == len(head) and set(lines[1]) == {'='}
