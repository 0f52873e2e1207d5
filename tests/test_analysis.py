"Integration tests of `cnn_cost.analysis`: efficiency hand counts, calibration relations, cost_sweep exponents on resnet18, compare, plots to PNG"
import os, math, pytest, numpy as np, torch, torch.nn as nn, matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from pathlib import Path
from cnn_cost.all import *
from conftest import new_seed_learner
from cnn_cost.analysis import _ceilings, fit_exponent, get_ceilings

FIXED = Ceilings(1e10, 1e10, 1e-3)   # 10 GFLOP/s, 10 GB/s, 1 µs per call: ridge at 1 FLOP/byte

def tiny_cnn(): return nn.Sequential(nn.Conv2d(3,8,3,padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,10))

@pytest.fixture(scope='module')
def learn(): return new_seed_learner(seed=None)

@pytest.fixture(scope='module')
def cs_learn(learn): return learn.cost_summary(learn.dls.one_batch()[0][:8], n_repeat=2, n_warmup=1)

def test_hand_counts_seed_model(cs_learn):
    "Stem conv, its BatchNorm and the last Linear of the seed's resnet18 on 8 x 3 x 28 x 28, counted by hand"
    e = cs_learn.efficiency(FIXED).set_index('name')
    conv,bn,lin = e.loc['0.0'],e.loc['0.1'],e.loc['1.8']
    assert (conv.type,bn.type,lin.type) == ('Conv2d','BatchNorm2d','Linear')
    assert conv.bytes == 4*8*3*28*28 + 4*64*3*7*7 + 4*8*64*14*14
    assert conv.flops == 2*8*64*14*14*3*7*7
    assert math.isclose(conv.intensity, conv.flops/conv.bytes)
    assert bn.bytes == 2*4*8*64*14*14 + 4*2*64
    assert bn.flops == 8*64*14*14 + 4*64
    assert lin.bytes == 4*8*512 + 4*512*10 + 4*8*10      # fastai's last Linear has no bias (a BatchNorm1d precedes it)
    assert lin.flops == 2*8*10*512
    assert math.isclose(lin.intensity, lin.flops/lin.bytes)
    assert (conv.bound, bn.bound) == ('compute', 'memory')
    assert e.loc['1.1'].bound == 'overhead'   # Flatten does no arithmetic

def test_calibration_relations():
    c = calibrate()
    assert calibrate() is c
    assert c.flops > 1e8 and c.bw > 1e8 and c.floor_ms > 0
    tiny = model_cost(nn.Sequential(nn.Conv2d(8,8,1)), torch.randn(1,8,4,4), n_repeat=3).efficiency(c)
    assert c.flops > 20*tiny.gflops[0]*1e9
    assert tiny.bound[0] == 'overhead'
    try:
        u = set_ceilings(flops=1e12)
        assert get_ceilings() is u and u.flops == 1e12 and u.bw == c.bw and u.src == 'user'
    finally: _ceilings['cpu'] = c

@pytest.mark.slow  # resnet18 timed at 7 sizes up to 256 px; `test_sweep_learner` keeps a sweep in the default run
def test_sweep_resnet18_exponent():
    "Sizes 32..256: every stride divides, body MACs grow as size^2 exactly, the total within 1% (the head is constant); 28..224 fits lower"
    from torchvision.models import resnet18
    m = resnet18()
    k = cost_sweep(m, sizes=(32,64,128,256), bss=(1,), n_repeat=1, n_warmup=0, progress=False).exponents().iloc[0]
    assert abs(k.body_macs-2) < 1e-6
    assert abs(k.macs-2) < 0.02 and k.macs < 2
    k2 = cost_sweep(m, sizes=(28,56,112), bss=(1,), n_repeat=1, n_warmup=0, progress=False).exponents().iloc[0]
    assert k2.body_macs < k.body_macs - 0.05

def test_sweep_learner(learn, tmp_path):
    sw = cost_sweep(learn, sizes=(16,32), bss=(1,2), n_repeat=1, n_warmup=0, progress=True)
    assert len(sw.df) == 4 and list(sw.df['size']) == [16,32,16,32]
    ex = sw.exponents().set_index(['vs','at'])
    assert abs(ex.loc[('bs','size=32'),'body_macs'] - 1) < 1e-9
    fig = sw.plot(tmp_path/'sweep_learner.png'); plt.close(fig)
    assert (tmp_path/'sweep_learner.png').stat().st_size > 10_000

def test_compare_self_and_bf16(cs_learn, learn):
    d = compare(cs_learn, cs_learn)
    assert d.same_arch
    for c in ['params','macs','act_bytes','bytes','time_ms']: assert d.layers[f'd_{c}'].abs().sum() == 0
    xb = learn.dls.one_batch()[0][:8]
    c16 = learn.cost_summary(xb, n_repeat=1, autocast=torch.autocast('cpu', dtype=torch.bfloat16))
    d = c16 - cs_learn
    conv = d.layers[d.layers.type=='Conv2d']
    assert len(conv) == 20 and (conv.r_act_bytes == 0.5).all() and (conv.r_macs == 1).all()
    assert d.totals.loc['macs','ratio'] == 1 and d.totals.loc['act_bytes','ratio'] < 0.75

def test_plots_render(cs_learn, tmp_path):
    for f,name in [(cs_learn.plot_roofline, 'roofline_resnet18.png'), (cs_learn.plot_stages, 'stages_resnet18.png')]:
        fig = f(tmp_path/name); plt.close(fig)
        assert (tmp_path/name).stat().st_size > 10_000

def test_cache_sizes_from_the_machine():
    "The cache sizes read from sysfs agree with glibc's sysconf, an independent reader; calibrate measures a rate for each level it keeps"
    from cnn_cost.analysis import cache_sizes
    sizes = cache_sizes()
    for lv,name in [('L1','SC_LEVEL1_DCACHE_SIZE'), ('L2','SC_LEVEL2_CACHE_SIZE'), ('L3','SC_LEVEL3_CACHE_SIZE')]:
        ref = os.sysconf(name) if name in os.sysconf_names else 0
        if ref > 0 and lv in sizes: assert sizes[lv] == ref, (lv, sizes[lv], ref)
    c = calibrate()
    assert all(sizes[n] == sz and b > 0 for n,sz,b in c.caches)

def test_roof_from_the_level_that_holds_the_tensors(cs_learn):
    "With a 1 MB cache at 5x DRAM's rate, rows whose tensors fit take the cache's rate, the others DRAM's; the compute roof is unchanged"
    cc = Ceilings(1e10, 1e10, 1e-3, caches=(('L2', 2**20, 5e10),))
    e,ec = cs_learn.efficiency(FIXED),cs_learn.efficiency(cc)
    fits = e.bytes/e.calls.clip(lower=1) <= 2**20
    assert fits.any() and (~fits).any()
    assert (ec.level[fits] == 'L2').all() and (ec.level[~fits] == 'DRAM').all() and (e.level == 'DRAM').all()
    assert np.allclose(ec.memory_ms[fits], e.memory_ms[fits]/5) and np.allclose(ec.memory_ms[~fits], e.memory_ms[~fits])
    assert np.allclose(ec.compute_ms, e.compute_ms)

def test_no_row_over_its_roof_unflagged(cs_learn):
    "No row is reported above 100% of its roof: a row faster than its roof is `over_roof` with a NaN percentage (before: 17 of 61 rows over 100%)"
    from copy import copy
    for c in (calibrate(), FIXED, Ceilings(1e8, 1e8, 1e-3)):  # the machine's, a fixed one, and one so low that most rows beat it
        e = cs_learn.efficiency(c)
        assert not (e.pct_roof > 100).any()
        timed = e.time_ms.notna() & (e.time_ms > 0)
        assert (e.over_roof == (e.roof_ms > e.time_ms)).all()
        assert e.pct_roof[e.over_roof].isna().all() and e.pct_roof[timed & ~e.over_roof].notna().all()
    assert cs_learn.efficiency(Ceilings(1e8, 1e8, 1e-3)).over_roof.sum() > 10   # the flag can fire

class Routed(nn.Module):
    "A stem conv every size runs, and a second conv only for images of 64 px or more: the layers differ by size"
    def __init__(self):
        super().__init__()
        self.stem,self.big,self.head = nn.Conv2d(3,8,3,padding=1),nn.Conv2d(8,8,3,padding=1),nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8,10))
    def forward(self, x):
        x = self.stem(x)
        return self.head(self.big(x) if x.shape[-1] >= 64 else x)

def test_sweep_layers_differ():
    "A model whose layers differ by size: the sweep says so (attribute and note) and fits the exponents over the rows every size ran"
    sw = cost_sweep(Routed(), sizes=(32,64,128), bss=(1,), n_repeat=1, n_warmup=0, progress=False)
    assert sw.layers_differ and set(sw.only_some) == {(64,1), (128,1)} and all(v == ['big'] for v in sw.only_some.values())
    assert 'big' not in sw.common and 'stem' in sw.common and len(sw.notes) == 1
    k = sw.exponents().iloc[0]
    assert abs(k.body_macs - 2) < 1e-9          # the stem conv alone: exactly size^2
    raw = fit_exponent(sw.df['size'], sw.df.body_macs)
    assert raw > 2.2                            # what a fit over every row ran would have said
    assert math.isnan(k.forward_ms)             # the whole forward cannot be split by rows: not fit
    assert sw.notes[0] in str(sw)
    same = cost_sweep(tiny_cnn(), sizes=(16,32), bss=(1,), n_repeat=1, n_warmup=0, progress=False)
    assert not same.layers_differ and same.notes == [] and not math.isnan(same.exponents().iloc[0].forward_ms)
