"Integration and reliability tests of `model_cost` / `learn.cost_summary()` and the `CostSummary` they return."
import re, json, time, math, pytest, torch, torch.nn as nn, torch.nn.functional as F
from pathlib import Path
from torch.utils.flop_counter import FlopCounterMode
from fastai.callback.hook import layer_info
from cnn_cost.all import *
from cnn_cost.summary import hooks_slow_max
from cnn_cost.counting import count_pass
from conftest import hook_count, heavy

def seed_rows():
    "(type, output shape, params, trainable) of each row of the forum answer's `learn.summary()` table"
    pat = re.compile(r'^(\w+) ((?:\d+ x )*\d+) ([\d,]+) (True|False)$')
    return [(m[1], m[2], int(m[3].replace(',', '')), m[4]=='True') for l in (Path(__file__).parent/'data'/'seed_summary.txt').read_text().splitlines()
            if (m := pat.match(l))]

# The seed's setup
def test_rows_match_fastai_summary_and_seed_table(seed_learner, seed_summary):
    leaves = seed_summary.df[seed_summary.df.kind=='leaf']
    ours = list(zip(leaves.type, leaves.output_shape, leaves.params, leaves.trainable))
    xb = seed_learner.dls.train.one_batch()[0]
    fa = [o for o in layer_info(seed_learner, xb) if o is not None]
    theirs = [(t, ' x '.join(map(str, (64,)+tuple(sz[1:]))), p or 0, bool(trn)) for t,p,trn,sz,_ in fa]
    assert len(ours) == 60
    assert ours == theirs
    assert ours == seed_rows()
    assert seed_summary.total_params == 11_708_992

def test_macs_closed_form_and_flop_counter(seed_learner, seed_summary):
    model = seed_learner.model
    mods = dict(model.named_modules())
    for r in seed_summary.df.itertuples():
        m = mods[r.name]
        out = [int(s) for s in r.output_shape.split(' x ')]
        if isinstance(m, nn.Conv2d): assert r.macs == math.prod(out)*m.in_channels//m.groups*m.kernel_size[0]*m.kernel_size[1]
        if isinstance(m, nn.Linear): assert r.macs == math.prod(out)*m.in_features
    xb = seed_learner.dls.train.one_batch()[0]
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model.eval()(xb)
    assert seed_summary.total_macs == fc.get_total_flops()//2 == 2_224_930_816

def test_seed_answer_in_numbers(seed_summary):
    "The forum's claim, measured: activations concentrate in the first stages, parameters in the last"
    st = seed_summary.stages()
    assert st.pct_act.iloc[0] > st.pct_act.iloc[-2] and st.pct_params.iloc[0] < st.pct_params.iloc[-2]
    assert abs(st.pct_macs.sum()-100) < 1e-6 and abs(st.pct_time.sum()-100) < 1e-6

# Time
def test_times_measured_and_add_up(seed_summary):
    cs = seed_summary
    assert (cs.df.time_ms > 0).all() and (cs.df.time_ms_min <= cs.df.time_ms).all() and (cs.df.time_ms <= cs.df.time_ms_max).all()
    coverage = sorted(sum(r.times[i] for r in cs.records)/h for i,h in enumerate(cs.hooked_ms))
    assert abs(coverage[len(coverage)//2] - 1) <= 0.03   # median over rounds: one round preempted by another process does not decide
    # how much the hooks cost is a speed (bench/hook_overhead.py measures it: 1.03x on an idle machine); under load it reads
    # 2-3.5x here (three test runs on 2 cores), so what a test can hold is that the summary says so whenever it is large
    assert math.isfinite(cs.hook_overhead) and cs.hooks_slow == (cs.hook_overhead > hooks_slow_max) and f'hooks x{cs.hook_overhead:.2f}' in str(cs)
    assert cs.n_passes == 2 + 2*7   # the counting pass and the unhooked op pass (`plain_ops`, names only; both also warm up), 7 hooked and 7 plain

class Sleep(nn.Module):
    def __init__(self, s): super().__init__(); self.s = s
    def forward(self, x): time.sleep(self.s); return x

def test_slow_layer_measured():
    m = nn.Sequential(nn.Linear(8, 8), Sleep(0.03), nn.ReLU())
    cs = model_cost(m, torch.randn(4, 8), n_repeat=3, n_warmup=0)
    t = cs.df.set_index('name').time_ms
    assert 29 < t['1'] < 45 and t['0'] < 5 and t['2'] < 5

def test_outside_leaf_work_is_a_row():
    class Res(nn.Module):
        def __init__(self): super().__init__(); self.conv = nn.Conv2d(8, 8, 3, padding=1)
        def forward(self, x): return F.relu(self.conv(x) + x).flatten(1)
    cs = model_cost(Res(), torch.randn(2, 8, 16, 16), n_repeat=2)
    own = cs.df[cs.df.kind=='own']
    assert own.name.tolist() == [''] and own.elem_ops.iloc[0] == 3*2*8*16*16 and own.time_ms.iloc[0] > 0

# Inputs and outputs of every shape
class Multi(nn.Module):
    def __init__(self): super().__init__(); self.a,self.b = nn.Linear(4, 3),nn.Linear(5, 3)
    def forward(self, x, y): return {'a': self.a(x), 'pair': (self.b(y), [self.a(x)])}

def test_dict_tuple_list_outputs_and_several_inputs():
    cs = model_cost(Multi(), torch.randn(2, 4), torch.randn(2, 5), n_repeat=2)
    df = cs.df.set_index('name')
    assert df.loc['a','calls'] == 2 and df.loc['a','macs'] == 2*2*4*3 and df.loc['a','act_elems'] == 2*6
    assert df.loc['b','macs'] == 2*5*3
    assert cs.input_shapes == [torch.Size([2,4]), torch.Size([2,5])]

def test_model_kwargs():
    cs = model_cost(Multi(), torch.randn(2, 4), model_kwargs={'y': torch.randn(2, 5)}, n_repeat=2)
    assert cs.df.set_index('name').loc['b','macs'] == 30

def test_frozen_and_paramless():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 2))
    for p in m[0].parameters(): p.requires_grad_(False)
    cs = model_cost(m, torch.randn(2, 3, 8, 8), n_repeat=2)
    leaves = cs.df[cs.df.kind=='leaf']
    assert leaves.trainable.tolist() == [False, False, False, False, True]
    assert leaves.params.tolist() == [112, 0, 0, 0, 74]
    assert cs.trainable_params == 74 and cs.total_params == 186

def test_channels_last_same_counts():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(4, 3, 16, 16)
    a = model_cost(m, x, n_repeat=2)
    b = model_cost(m.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last), n_repeat=2)
    assert a.df.macs.tolist() == b.df.macs.tolist() and a.df.output_shape.tolist() == b.df.output_shape.tolist()
    assert a.total_act_bytes == b.total_act_bytes

def test_dtype_aware_bytes():
    m = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(4, 16)
    a = model_cost(m, x, n_repeat=1)
    b = model_cost(m.to(torch.bfloat16), x.to(torch.bfloat16), n_repeat=1)
    assert a.total_act_bytes == 2*b.total_act_bytes and a.total_macs == b.total_macs

@pytest.mark.cuda
def test_half_on_cuda():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).cuda().half()
    cs = model_cost(m, torch.randn(8, 3, 32, 32, device='cuda').half(), n_repeat=3)
    assert cs.device.type == 'cuda' and (cs.df.time_ms > 0).all()
    assert cs.df.act_bytes.iloc[0] == 8*8*30*30*2

def test_mha_fast_path_reported():
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 10, 32)
    class Wrap(nn.Module):
        def __init__(self): super().__init__(); self.mha = mha
        def forward(self, x): return self.mha(x, x, x, need_weights=False)[0]
    cs = model_cost(Wrap(), x, n_repeat=2)
    assert 'mha.out_proj' in cs.uncalled and 'mha.out_proj' not in cs.df.name.tolist()
    assert cs.total_macs == 2*(10*32*32*4 + 2*10*10*32)

# Errors leave nothing broken
def test_device_mismatch_clear_error():
    m = nn.Linear(3, 3)
    with pytest.raises(ValueError, match=r"model is on cpu but the batch is on meta: move one"): model_cost(m, torch.randn(2, 3, device='meta'))
    with pytest.raises(ValueError, match="has no tensor"): model_cost(m, 3)
    assert hook_count(m) == 0

class FailAfter(nn.Module):
    def __init__(self, n): super().__init__(); self.n,self.calls = n,0
    def forward(self, x):
        self.calls += 1
        if self.calls > self.n: raise RuntimeError('failed in forward')
        return x

@pytest.mark.parametrize('n', [0, 1, 5])   # in the counting pass, a warm-up, a timed round
def test_state_restored_after_error(n):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(), FailAfter(n)).train()
    m[2].eval()
    sd = {k: v.clone() for k,v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match='failed in forward'): model_cost(m, torch.randn(2, 3, 8, 8), n_repeat=3)
    assert hook_count(m) == 0
    assert [o.training for o in m.modules()] == [True, True, True, False, True]
    for k,v in m.state_dict().items(): assert torch.equal(v, sd[k]), k

def test_learner_state_unchanged(seed_learner):
    m = seed_learner.model.train()
    sd = {k: v.clone() for k,v in m.state_dict().items()}
    seed_learner.cost_summary(n_repeat=1, n_warmup=0)
    assert m.training and all(o.training for o in m.modules()) and hook_count(m) == 0
    for k,v in m.state_dict().items(): assert torch.equal(v, sd[k]), k

def test_uncounted_layer_flagged():
    class Fused(nn.Module):  # pairwise distances: a kernel with no MAC formula (`torch.lstm`'s CPU kernel has one since `mkldnn_rnn_layer_macs`)
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.randn(8, 4))
        def forward(self, x): return torch.cdist(x, self.w)
    cs = model_cost(nn.Sequential(Fused()), torch.randn(5, 3, 4), n_repeat=1)
    assert cs.uncounted == ['0'] and list(cs.unknown_ops.values()) == [['0']]
    assert cs.df.macs_src.tolist()[0] == 'uncounted' and any(l.split()[:2] == ['Fused', '0'] and '?' in l for l in str(cs).splitlines())   # marked `?` on its row

def test_renderings(seed_summary, tmp_path):
    cs = seed_summary
    s = str(cs)
    assert s.startswith('Sequential (Input shape: 64 x 3 x 28 x 28)') and 'Total params: 11,708,992' in s
    lines = s.splitlines()   # fastai's layout with a name column: type, name, then the output shape's group line, one row per module
    assert lines[2].split()[:5] == ['Layer', '(type)', 'Name', 'Output', 'Shape'] and lines[4].strip() == '64 x 64 x 14 x 14'
    assert [l.split()[:2] for l in lines if l.startswith('Conv2d')][1] == ['Conv2d', '0.4.0.conv1']
    foot = lines[lines.index('', lines.index('')+1)+1:]   # after the rows and the stages: the facts, then one sentence per condition
    assert len(cs.facts()) <= 8 and all(len(l) <= 110 for l in cs.facts()) and sum(l.startswith('Timing:') for l in foot) == 1
    assert foot == cs.facts() + cs.conditions() and len(cs.conditions()) == cs.disturbed + cs.hooks_slow + bool(cs.loose and not cs.disturbed)
    assert cs._repr_html_().count('<table') == 2
    cs.to_csv(tmp_path/'a.csv'); assert (tmp_path/'a.csv').read_text().count('\n') == len(cs.df)+1
    assert cs.to_markdown().count('| Conv2d ') == 20
    md,js = cs.to_markdown(path=tmp_path/'a.md'),cs.to_json(path=tmp_path/'a.json')  # written where asked, the same text as returned
    assert (tmp_path/'a.md').read_text() == md and json.loads((tmp_path/'a.json').read_text())['totals']['total_macs'] == cs.total_macs
    assert cs.top(3).time_ms.is_monotonic_decreasing

def test_forward_only_backward_unknown(seed_summary):
    "`cost_summary` runs no backward: its backward work and saved bytes are unknown (NaN, blank), not 0; a counted backward fills them"
    cs = seed_summary
    assert cs.df[['bwd_macs','bwd_elem_ops','recompute_macs','recompute_elem_ops','saved_bytes']].isna().all().all()
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    df = CostSummary(count_pass(m, (torch.randn(2, 4),), backward=True)).df
    assert df.bwd_macs.tolist()[:2] == [2*4*4, 0]   # the weight gradient only: the input needs none

# Modules that take no hooks: TorchScript (scripted, traced) and `torch.export`, measured from outside as one row
def _opaque(kind, inner_x):
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(8,8,3,padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(8,8,1)))
    if kind=='script': return torch.jit.script(body)
    if kind=='trace': return torch.jit.trace(body, inner_x)
    return torch.export.export(body, (inner_x,)).module()

def _params(m): return [(p, p.detach().clone()) for p in list(m.parameters())+list(m.buffers())]
def _hooks(m): return sum(len(o._forward_hooks)+len(o._forward_pre_hooks) for o in m.modules())  # `hook_count` reads a ScriptModule's `_backward_pre_hooks` wrongly
def _same(ps, m): return [id(p) for p,_ in ps] == [id(p) for p in list(m.parameters())+list(m.buffers())] and all(torch.equal(p, c) for p,c in ps)

@pytest.mark.parametrize('kind', ['script', 'trace', 'export'])
@pytest.mark.parametrize('where', ['nested', 'root'])
def test_opaque_module_one_row(kind, where):
    "One row for the module, children not shown, its MACs from its ops (FlopCounterMode agrees), its time measured; nothing left behind"
    x = torch.randn(4,8,12,12)
    inner = _opaque(kind, x)
    m = nn.Sequential(nn.Conv2d(8,8,1), nn.Sequential(nn.ReLU(), inner), nn.Flatten()) if where=='nested' else inner
    ps,modes,h0 = _params(m),[o.training for o in m.modules()],_hooks(m)   # `torch.export`'s module has hooks of its own
    with FlopCounterMode(display=False) as fc, torch.no_grad(): m(x)
    if kind=='script' and where=='root':  # nothing to measure it from: refused up front, with what to do
        with pytest.raises(ValueError, match=r'takes no module hooks.*nn\.Sequential\(model\)'): model_cost(m, x, n_repeat=1)
    else:
        cs = model_cost(m, x)
        row = cs.df[cs.df.opaque!='']
        assert len(row) == 1 and row.name.iloc[0] == ('1.1' if where=='nested' else '') and list(cs.opaque) == list(row.name)
        assert not any(n.startswith(row.name.iloc[0]+'.') for n in cs.df.name if row.name.iloc[0])   # its children not shown
        assert cs.total_macs == fc.get_total_flops()//2 and row.macs.iloc[0] == 4*12*12*8*(8*9+8) and row.macs_src.iloc[0] == 'ops'
        assert row.time_ms.iloc[0] > 0 and row.output_shape.iloc[0] == '4 x 8 x 12 x 12'
    assert _hooks(m) == h0
    assert _same(ps, m) and [o.training for o in m.modules()] == modes
    if where=='nested': assert m[1][1] is inner                                              # the stand-in taken out again

def test_opaque_module_in_learner_and_profiler():
    "`learn.cost_summary()` and a `CostProfiler` fit with a scripted submodule: one row with forward and backward work; the model as it was"
    from fastai.vision.all import Learner, DataLoaders, ProgressCallback, noop
    from cnn_cost.callback import CostProfiler
    inner = _opaque('script', None)
    m = nn.Sequential(nn.Conv2d(3,8,3,padding=1), inner, nn.Flatten(), nn.Linear(8*16*16,10))
    x,y = torch.randn(64,3,16,16),torch.randint(0,10,(64,))
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:16], bs=8, device='cpu')
    learn = Learner(dls, m, loss_func=nn.CrossEntropyLoss()); learn.remove_cb(ProgressCallback); learn.logger = noop
    cs = learn.cost_summary(n_repeat=2)
    assert list(cs.opaque) == ['1'] and cs.df.set_index('name').macs['1'] == 8*16*16*8*(8*9+8)
    learn.fit(1, 1e-3, cbs=CostProfiler(skip=2, n_batches=3))
    s = learn.train_profile.summary().df.set_index('name')
    assert s.bwd_macs['1'] > 0 and s.time_ms['1'] > 0 and s.bwd_ms['1'] > 0 and m[1] is inner
    assert _hooks(m) == 0

@pytest.mark.parametrize('arch', heavy(['resnet18', 'resnet50'], ('resnet50',)))
def test_stages_are_the_networks(arch):
    "A block's shared `ReLU xN` row (listed at its first call's shape) is filed with its block's rows: each stage label once, in the network's order"
    import torchvision
    torch.manual_seed(0)
    m = getattr(torchvision.models, arch)()
    cs = model_cost(m, torch.randn(1,3,64,64), n_repeat=1)
    st = cs.stages()
    assert st.stage_label.tolist() == ['32x32', '16x16', '8x8', '4x4', '2x2', '1x1', 'flat']
    assert st.layers.sum() == (cs.df.kind=='leaf').sum() and st.macs.sum() == cs.total_macs
    df = cs.df.reset_index(drop=True)
    for i in df.index[df.calls>1]:                          # each reused row sits in the stage of the row before it in its block
        assert df.stage[i] == df.stage[i-1] and df.name[i-1].rpartition('.')[0] == df.name[i].rpartition('.')[0]
    assert (df.calls>1).sum() == (16 if arch=='resnet50' else 8)
