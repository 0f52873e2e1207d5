"""Tests of `cnn_cost.counting`: MAC counts against independent references (published figures, `FlopCounterMode`, hand counts),
the attention kernels' formulas, and rows that describe what ran."""
# --- Published figures and FlopCounterMode ---
# Independent references for cnn_cost's MAC counts.
#
# - torchvision's published GFLOPS (`weights.meta['_ops']`, in GMACs despite the name: the figure `torch.utils.flop_counter` / 2 gives)
#   for a spread of architectures at their reference resolution, batch 1, eval mode, no weights downloaded. MACs depend on shapes only,
#   so these models are built on the `meta` device (no memory, no compute: the whole spread counts in seconds on 2 cores);
#   `test_real_equals_meta` checks that real tensors with random weights give the same counts, fused fast paths included;
# - `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2) on the same batch;
# - the seed's figure, resnet18 in a fastai `vision_learner` on 64 x 3 x 28 x 28: 2,224,930,816;
# - `nn.MultiheadAttention`, whose eval-mode fast path runs one fused `aten._native_multi_head_attention`, against a hand count.
import pytest, torch, torch.nn as nn, torchvision
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode
from cnn_cost.all import *
from cnn_cost.counting import count_pass
from conftest import new_seed_learner, heavy
from kinds import TIMM, TV_FAMILIES

TV = torchvision.models.list_models(module=torchvision.models)
TV_SIZES = heavy(TV, set(TV)-set(TV_FAMILIES))  # every torchvision classification model; the other sizes of each family are slow

# name: kind of architecture. torchvision publishes `_ops` rounded to 3 decimals of GFLOPS, well inside 1% for all of these.
ARCHS = {'vgg11': 'plain', 'alexnet': 'plain', 'resnet18': 'residual', 'resnet50': 'residual', 'mobilenet_v2': 'depthwise',
         'mobilenet_v3_small': 'depthwise + squeeze-excite', 'efficientnet_b0': 'depthwise + squeeze-excite', 'resnext50_32x4d': 'grouped',
         'regnet_y_400mf': 'grouped + squeeze-excite', 'shufflenet_v2_x1_0': 'grouped + channel shuffle', 'densenet121': 'dense',
         'googlenet': 'multi-branch', 'convnext_tiny': 'depthwise 7x7 + LayerNorm + Linear on NHWC', 'vit_b_16': 'attention (nn.MultiheadAttention)',
         'swin_t': 'attention (F.linear inside modules, shifted windows)'}
TRANSFORMERS = {'vit_b_16', 'swin_t'}

def total_macs(model, xb): return sum(r.macs for r in count_pass(model, xb))

class OpLog(TorchDispatchMode):
    "The aten ops a forward runs"
    def __init__(self): super().__init__(); self.ops = set()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func._overloadpacket).replace('aten.', '')); return func(*args, **(kwargs or {}))

def build(name, device='meta'):
    "torchvision's `name` in eval on `device` with random weights, a batch of 1 at its reference resolution, and its published MACs"
    w = torchvision.models.get_model_weights(name).DEFAULT
    sz = w.transforms().crop_size[0]
    torch.manual_seed(0)
    kw = {'init_weights': False} if name=='googlenet' else {}  # its default init copies data out of a tensor: impossible on `meta`
    if name.startswith('vit_') and sz!=224: kw['image_size'] = sz  # vit_h_14's reference weights are for 518 px
    try:
        with torch.device(device): model = torchvision.models.get_model(name, weights=None, **kw)
    except NotImplementedError: model = torchvision.models.get_model(name, weights=None, **kw).to(device)  # regnet computes its widths with tensors
    model.eval()
    return name, model, (torch.randn(1, 3, sz, sz, device=device),), w.meta['_ops']*1e9

@pytest.fixture(scope='module', params=list(ARCHS))
def arch(request): return build(request.param)

def test_published_gflops(arch):
    name, model, xb, pub = arch
    macs = total_macs(model, xb)
    assert macs == pytest.approx(pub, rel=0.01), f"{name} ({ARCHS[name]}): cnn_cost {macs:,} MACs, torchvision publishes {pub:,.0f}"

def test_no_uncounted_layer(arch):
    name, model, xb, _ = arch
    recs = count_pass(model, xb)
    assert not [r.name for r in recs if r.macs_src=='uncounted'], f"{name}: uncounted layers"
    assert all(r.macs >= 0 and r.elem_ops >= 0 for r in recs)

@pytest.mark.parametrize('name', TV_SIZES)
def test_every_torchvision_model_counted(name):
    "Every torchvision classification model, on `meta` at its reference size: no row uncounted, eval forward or train forward and backward"
    _, model, (x,), _ = build(name)
    for train in (False, True):
        model.train(train)
        recs = count_pass(model, (x.expand(2, -1, -1, -1) if train else x,), backward=train)  # batch norm trains on 2 samples or more
        bad = {r.name: r.unknown_ops + r.bwd_unknown_ops for r in recs if 'uncounted' in (r.macs_src, r.bwd_src)}
        assert not bad, f"{name} ({'train' if train else 'eval'}): ops without a formula {bad}"
        assert sum(r.macs for r in recs) > 0 and (not train or sum(r.bwd_macs for r in recs) > 0)

def test_flop_counter(arch):
    "Equal to `torch.utils.flop_counter` on the same batch; for the transformers in train mode, where no fused fast path hides the matmuls from it"
    name, model, xb, _ = arch
    macs = total_macs(model, xb)
    if name in TRANSFORMERS:
        model.train()
        try:
            assert total_macs(model, xb) == macs, f"{name}: train and eval mode differ"
            ref = fc_macs(model, *xb)
        finally: model.eval()
    else: ref = fc_macs(model, *xb)
    assert macs == ref, f"{name}: cnn_cost {macs:,} vs flop_counter {ref:,}"

@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v2', 'vit_b_16'])
def test_real_equals_meta(name):
    """On real tensors (CPU, random weights) every row counts the MACs it counts on `meta`; vit_b_16's attention then takes the fused fast path.
    (The fused `_native_multi_head_attention` hides its softmax and intermediate tensors, so `elem_ops` and `act_elems` are compared for the CNNs only.)"""
    _, real, xb, pub = build(name, 'cpu')
    _, meta, xm, _ = build(name)
    rr, rm = count_pass(real, xb), count_pass(meta, xm)
    assert [(r.name, r.calls, r.macs) for r in rr] == [(r.name, r.calls, r.macs) for r in rm]
    if name!='vit_b_16': assert [(r.elem_ops, r.act_elems, r.act_bytes) for r in rr] == [(r.elem_ops, r.act_elems, r.act_bytes) for r in rm]
    assert sum(r.macs for r in rr) == pytest.approx(pub, rel=0.01)
    if name=='vit_b_16':
        with torch.no_grad(), OpLog() as log: real(*xb)
        assert '_native_multi_head_attention' in log.ops, "eval-mode fast path not taken: this test no longer covers it"

def test_seed_figure():
    "The seed's setup on one real batch of the digits: total MACs and params, and the same as `flop_counter` and `model_cost`"
    learn = new_seed_learner(seed=None)
    xb = learn.dls.train.one_batch()[:1]
    model = learn.model.eval()
    assert tuple(xb[0].shape) == (64, 3, 28, 28)
    macs = total_macs(model, xb)
    assert macs == 2_224_930_816
    assert fc_macs(model, *xb) == macs
    s = model_cost(model, *xb, n_warmup=0, n_repeat=1)
    assert s.total_macs == macs and s.total_params == 11_708_992

# nn.MultiheadAttention: eval mode (no grad) takes the fused fast path, train mode the composite ops; both must count the same,
# equal to the hand count: in-projections of q, k, v, scores q kᵀ, weighted values, out-projection.
def mha_hand(b, lq, lk, e): return b*(lq*e*e + 2*lk*e*e + 2*lq*lk*e + lq*e*e)

class SelfAttn(nn.Module):
    def __init__(self, e, h, need_weights=False): super().__init__(); self.attn,self.nw = nn.MultiheadAttention(e, h, batch_first=True),need_weights
    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return self.attn(x, kv, kv, need_weights=self.nw)[0]

@pytest.mark.parametrize('need_weights', [False, True])
@pytest.mark.parametrize('lk', [None, 7])
def test_multihead_attention(need_weights, lk):
    e,h,b,lq = 64,4,3,10
    torch.manual_seed(0)
    model, x = SelfAttn(e, h, need_weights), torch.randn(b, lq, e)
    xb = (x,) if lk is None else (x, torch.randn(b, lk, e))
    hand = mha_hand(b, lq, lk or lq, e)
    res = {}
    for mode in ('eval', 'train'):
        getattr(model, mode)()
        with torch.no_grad(), OpLog() as log: model(*xb)
        res[mode] = total_macs(model, xb), log.ops
    if lk is None and not need_weights: assert '_native_multi_head_attention' in res['eval'][1], "eval-mode fast path not taken"
    assert '_native_multi_head_attention' not in res['train'][1]
    assert res['eval'][0] == res['train'][0] == hand
    s = model_cost(model.eval(), *xb, n_warmup=0, n_repeat=1)
    assert s.total_macs == hand and not s.uncounted
    assert 'attn.out_proj' in s.uncalled  # MHA calls F.linear with its out_proj's weights: the summary says so

def test_transformer_encoder_layer_fast_path():
    "`nn.TransformerEncoderLayer` in eval runs one fused `aten._transformer_encoder_layer_fwd`: attention plus its MLP, as in train mode"
    e,h,ffn,b,l = 64,4,128,2,12
    torch.manual_seed(0)
    model, xb = nn.TransformerEncoderLayer(e, h, ffn, dropout=0., batch_first=True), (torch.randn(b, l, e),)
    hand = mha_hand(b, l, l, e) + 2*b*l*e*ffn
    model.train(); train = total_macs(model, xb)
    model.eval()
    with torch.no_grad(), OpLog() as log: model(*xb)
    assert train == total_macs(model, xb) == hand
    assert log.ops & {'_transformer_encoder_layer_fwd', '_native_multi_head_attention'}, "no fast path taken in eval"

# timm: one small model of each family a fastai user reaches for through `vision_learner(dls, 'name')`, convolutional and attention

@pytest.mark.parametrize('name', TIMM)
def test_timm_model_counted(name):
    "timm models on `meta` at their default input size: no row uncounted, eval forward or train forward and backward"
    timm = pytest.importorskip('timm')
    if name not in timm.list_models(): pytest.skip(f'{name} is not in timm {timm.__version__}')
    with torch.device('meta'): model = timm.create_model(name, pretrained=False)
    x = torch.randn(2, *model.pretrained_cfg.get('input_size', (3,224,224)), device='meta')
    for train in (False, True):
        recs = count_pass(model.train(train), (x,), backward=train)
        bad = {r.name: r.unknown_ops + r.bwd_unknown_ops for r in recs if 'uncounted' in (r.macs_src, r.bwd_src)}
        assert not bad, f"{name} ({'train' if train else 'eval'}): ops without a formula {bad}"
        assert sum(r.macs for r in recs) > 0 and (not train or sum(r.bwd_macs for r in recs) > 0)

# --- Attention kernels ---
# Attention MACs, forward and backward, on the installed torch: every SDPA variant a model can ask for on CPU, checked against a hand
# count and against `torch.utils.flop_counter` wherever it has a formula; every kernel formula against torch's own where both exist.
import math, pytest, torch, torch.nn as nn, torch.nn.functional as F
from torch.utils.flop_counter import flop_registry, FlopCounterMode
from cnn_cost.counting import count_pass, attention_macs, op_cost, op_kind, _op_rules, _op_first
from cnn_cost.learner import model_cost

aten = torch.ops.aten

class Attn(nn.Module):
    "Projections around `F.scaled_dot_product_attention`, with `kv_heads` key/value heads (grouped-query when fewer than `heads`)"
    def __init__(self, d=32, heads=4, kv_heads=4, p=0., causal=False, mask=None):
        super().__init__()
        self.q,self.kv = nn.Linear(d, d),nn.Linear(d, 2*d//heads*kv_heads)
        self.h,self.kh,self.e,self.p,self.causal,self.mask = heads,kv_heads,d//heads,p,causal,mask
    def forward(self, x, y):
        b,lq,lk = x.shape[0],x.shape[1],y.shape[1]
        q = self.q(x).view(b, lq, self.h, self.e).transpose(1, 2)
        k,v = self.kv(y).view(b, lk, 2, self.kh, self.e).permute(2, 0, 3, 1, 4)
        kw = dict(enable_gqa=True) if self.kh!=self.h else {}
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, dropout_p=self.p if self.training else 0.,
                                              is_causal=self.causal, **kw)

def _cases():
    lq,lk = 10,7
    return {'plain':      (dict(), lq, lq),
            'cross':      (dict(), lq, lk),                                              # query and key lengths differ
            'causal':     (dict(causal=True), lq, lq),
            'bool_mask':  (dict(mask=torch.rand(lq, lk)>0.3), lq, lk),
            'float_mask': (dict(mask=torch.randn(3, 1, lq, lk)), lq, lk),                       # additive, per sample
            'gqa':        (dict(kv_heads=2), lq, lk),                                    # 4 query heads over 2 key/value heads
            'dropout':    (dict(p=0.1), lq, lk)}

def _hand(b, h, lq, lk, e, backward=False): return b*h*lq*lk*((3*e + 2*e) if backward else 2*e)

@pytest.mark.parametrize('case', list(_cases()))
def test_sdpa_forward(case):
    "The attention row's own MACs are the two products q kᵀ and p v, whatever mask, causality, grouping or dropout"
    kw,lq,lk = _cases()[case]
    torch.manual_seed(0)
    m = Attn(**kw).train(kw.get('p', 0)>0)
    x,y = torch.randn(3, lq, 32),torch.randn(3, lk, 32)
    recs = {r.name: r for r in count_pass(m, (x, y))}
    own = recs['']  # the module's own work: everything outside its Linear children
    assert own.macs_src == 'ops' and own.unknown_ops == []
    assert own.macs == _hand(3, 4, lq, lk, 8), (own.macs, _hand(3, 4, lq, lk, 8))
    lin = 3*lq*32*32 + 3*lk*32*(2*8*m.kh)
    with FlopCounterMode(display=False) as fc: m(x, y)
    if fc.get_total_flops()//2 == lin:  # this torch's flop_counter misses the CPU kernel: the gap is exactly the attention
        assert not any(o in flop_registry for o in (aten._scaled_dot_product_flash_attention_for_cpu,))
    else: assert fc.get_total_flops()//2 == lin + own.macs

@pytest.mark.parametrize('case', ['plain', 'cross', 'causal', 'gqa', 'bool_mask'])
def test_sdpa_backward(case):
    "Backward MACs of the attention row: the fused kernel's formula (scores recomputed) or, on the math fallback, its matmuls' gradients"
    kw,lq,lk = _cases()[case]
    torch.manual_seed(0)
    m = Attn(**kw)
    x,y = torch.randn(3, lq, 32, requires_grad=True),torch.randn(3, lk, 32)
    recs = {r.name: r for r in count_pass(m, (x, y), backward=True)}
    own = recs['']
    assert own.bwd_src == 'ops' and own.bwd_unknown_ops == []
    # which kernel ran is torch's choice; the formula's figure (3e+2e per score) or the math fallback's matmul gradients (2e+2e)
    fused,math_ = _hand(3, 4, lq, lk, 8, backward=True),3*4*lq*lk*(2*8 + 2*8)
    assert own.bwd_macs in (fused, math_), (own.bwd_macs, fused, math_)
    with FlopCounterMode(display=False) as fc: 
        o = m(x, y); o.sum().backward()
    bwd_ops = {str(k) for k in fc.get_flop_counts()['Global']}
    if 'aten._scaled_dot_product_flash_attention_for_cpu_backward' in bwd_ops: assert own.bwd_macs == fused

def _args(name, q, k, v, backward):
    "Arguments of aten `name` (its backward if `backward`) in its own layout: (batch, heads, length, dim) for the SDPA ops, (batch, length, heads, dim) for the others"
    b,h,lq,e = q.shape
    if name.startswith('_scaled_dot_product'): return ((torch.empty_like(q), q, k, v) if backward else (q, k, v))
    q,k,v = [t.transpose(1, 2) for t in (q,k,v)]
    g,out,lk = torch.empty_like(q),torch.empty_like(q),k.shape[1]
    if name=='_flash_attention_forward':
        return (g, q, k, v, out, torch.empty(b, h, lq, device='meta'), None, None, lq, lk) if backward else (q, k, v, None, None, lq, lk)
    if name=='_efficient_attention_forward': return (g, q, k, v, None, out, None, None, lq, lk) if backward else (q, k, v, None, None, None, lq, lk)

KERNELS = ['_scaled_dot_product_flash_attention_for_cpu', '_scaled_dot_product_flash_attention', '_scaled_dot_product_efficient_attention',
           '_scaled_dot_product_cudnn_attention', '_flash_attention_forward', '_efficient_attention_forward']

@pytest.mark.parametrize('backward', [False, True])
@pytest.mark.parametrize('kernel', KERNELS)
def test_kernel_formula_matches_torch(kernel, backward):
    "Every attention kernel has a formula here; where torch's flop_registry has one too, they agree, and the op is counted once"
    name = kernel.replace('_forward', '_backward') if kernel.endswith('_forward') and backward else kernel + ('_backward' if backward else '')
    op = getattr(aten, name, None)
    if op is None: pytest.skip(f'{name} is not in this torch')
    q,k,v = [torch.empty(2, 4, l, 16, device='meta') for l in (10, 7, 7)]
    args = _args(kernel, q, k, v, backward)
    assert op in _op_rules and op_kind(op) == 'formula'
    ours = _op_rules[op](*args)
    assert ours == attention_macs(q, k, v, backward=backward)
    macs,elem,known = op_cost(op.default, args, {}, None)
    assert known and macs == ours  # one figure, never the sum of two rules
    if op in flop_registry and op not in _op_first: assert flop_registry[op](*args)//2 == ours

@pytest.mark.parametrize('name', ['_flash_attention_forward', '_flash_attention_backward', '_efficient_attention_forward', '_efficient_attention_backward'])
def test_seq_first_layout(name):
    "Why cnn_cost's rule goes first for these: torch's formula (efficient always, flash before 2.14) reads (batch, length, heads, dim) as (batch, heads, length, dim)"
    op,bwd = getattr(aten, name, None),'backward' in name
    if op is None: pytest.skip(f'{name} is not in this torch')
    q = torch.empty(2, 4, 10, 16, device='meta')  # 4 heads of length 10
    args,qt = _args(name.replace('_backward', '_forward'), q, q, q, bwd),q.transpose(1, 2)
    assert op in _op_first and op_cost(op.default, args, {}, None)[0] == attention_macs(q, q, q, backward=bwd)
    if op in flop_registry: assert flop_registry[op](*args)//2 in (attention_macs(q, q, q, backward=bwd), attention_macs(qt, qt, qt, backward=bwd))

def test_packed_varlen_is_uncounted():
    "A variable-length packed batch (cumulative sequence lengths) has no formula here: unknown, not 0"
    op = aten._flash_attention_forward
    q = torch.empty(20, 4, 16, device='meta')
    cu = torch.tensor([0, 8, 20])
    macs,_,known = op_cost(op.default, (q, q, q, cu, cu, 12, 12), {}, None)
    if op in flop_registry: assert known  # torch's formula reads the lengths
    else: assert not known

def test_mha_summary_row_no_silent_zero():
    "nn.MultiheadAttention in training mode (the CPU flash kernel) gets its attention MACs on every torch, forward and backward"
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).train()
    x = torch.randn(2, 9, 32)
    recs = {r.name: r for r in count_pass(mha, (x, x, x), kwargs=dict(need_weights=False), backward=True)}
    own = recs['']
    proj = 2*9*32*32*3 + 2*9*32*32  # in-projection (q, k, v) and out-projection
    assert own.macs == proj + _hand(2, 4, 9, 9, 8) and own.macs_src == 'ops'
    # x needs no gradient: the in-projection computes its weight gradient only; the out-projection both; then attention's backward
    grads = 2*9*32*32*3 + 2*(2*9*32*32)
    assert own.bwd_src == 'ops' and own.bwd_macs in (grads + _hand(2, 4, 9, 9, 8, backward=True), grads + 2*4*9*9*(2*8 + 2*8))

# --- What ran: layer rules and ops ---
# Every row describes what ran: layer rules only where the module runs its class's stock computation (LoRA-style subclasses, instance
# `forward`s, parametrized and weight-normed layers are counted from their ops), a rule equal to the ops it stands for over the torchvision
# and timm corpora, complex tensors in real MACs, the same counts under `inference_mode`, `no_grad` and grad enabled, fast paths that hooks
# switch off, and dynamic-quantized models. References: hand counts, and `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2) where it
# counts the same thing (it counts a complex product as one MAC and the nested fast path as nothing, so those are hand counts).
import warnings, pytest, torch, torch.nn as nn, torchvision
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode
from cnn_cost.all import *
from cnn_cost.counting import Counting, find_rule, plain_ops, path_note, count_pass

def fc_macs(model, *xb, **kw):
    "MACs by `torch.utils.flop_counter` (FLOPs / 2)"
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model(*xb, **kw)
    return fc.get_total_flops()//2

def rows(model, *xb, **kw): return {r.name: r for r in count_pass(model, xb, kwargs=kw)}

# --- 1. rules never hide executed work ---
class LoRALinear(nn.Linear):
    "A LoRA-style layer: the frozen linear plus a rank-`r` update `x Aᵀ Bᵀ`"
    def __init__(self, i, o, r):
        super().__init__(i, o); self.A,self.B = nn.Parameter(torch.randn(r, i)),nn.Parameter(torch.randn(o, r))
    def forward(self, x): return super().forward(x) + x @ self.A.t() @ self.B.t()

def test_lora_subclass_counted_from_ops():
    "256 → 256, rank 8, batch 32: 32·256·256 + 32·256·8 + 32·8·256 = 2,228,224 (the Linear rule alone: 2,097,152)"
    torch.manual_seed(0)
    m, x = LoRALinear(256, 256, 8), torch.randn(32, 256)
    hand = 32*256*256 + 32*256*8 + 32*8*256
    r = rows(m, x)['']
    assert (r.macs, r.macs_src) == (hand, 'ops') == (2_228_224, 'ops')
    assert fc_macs(m, x) == hand
    assert model_cost(m, x, n_warmup=0, n_repeat=1).total_macs == hand

class PlainSub(nn.Linear): pass   # a subclass that runs the stock forward keeps the rule

class Scaled(nn.Conv2d):
    "A conv that overrides `_conv_forward`, not `forward` (weight-standardised convs do this): its ops count"
    def _conv_forward(self, x, w, b): return super()._conv_forward(x, w - w.mean((1,2,3), keepdim=True), b)

class LowRank(nn.Module):
    "A parametrization: the weight is computed as `U V` on every access"
    def __init__(self, o, i, r): super().__init__(); self.U,self.V = nn.Parameter(torch.randn(o, r)),nn.Parameter(torch.randn(r, i))
    def forward(self, w): return self.U @ self.V

def test_rule_only_for_stock_forward():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    assert find_rule(PlainSub(16, 4)) is not None and find_rule(nn.LazyLinear(4)) is not None and find_rule(nn.LSTM(4, 4)) is not None
    inst = nn.Linear(16, 4); f = inst.forward; inst.forward = lambda x: f(x) + f(2*x)   # an instance-level override
    par = nn.Linear(16, 16); parametrize.register_parametrization(par, 'weight', LowRank(16, 16, 4))
    wn = torch.nn.utils.weight_norm(nn.Linear(16, 4))   # old-style: a forward pre-hook computes the weight
    sc = Scaled(3, 4, 3)
    for m in (inst, par, wn, sc): assert find_rule(m) is None, type(m)
    got = {k: {r.name: r for r in count_pass(nn.Sequential(m), (xb,))}['0'] for k,m,xb in [('sub', PlainSub(16, 4), x), ('inst', inst, x), ('par', par, x),
                                                                    ('wn', wn, x), ('sc', sc, torch.randn(2, 3, 8, 8))]}
    assert (got['sub'].macs_src, got['sub'].macs) == ('rule', 8*16*4)
    assert (got['inst'].macs_src, got['inst'].macs) == ('ops', 2*8*16*4)
    # a parametrized layer is a parent (its parametrization is a child module): U V on the child's row, the linear on its own
    rs = {r.name: r for r in count_pass(nn.Sequential(par), (x,))}
    assert (got['par'].kind, got['par'].macs_src, got['par'].macs, rs['0.parametrizations.weight.0'].macs) == ('own', 'ops', 8*16*16, 16*4*16)
    assert sum(r.macs for r in rs.values()) == fc_macs(nn.Sequential(par), x) == 8*16*16 + 16*4*16
    assert (got['wn'].macs_src, got['wn'].macs) == ('ops', 8*16*4) and got['wn'].elem_ops > 4*16   # the norm of the weight is its work
    assert (got['sc'].macs_src, got['sc'].macs) == ('ops', 2*4*6*6*3*9) and got['sc'].elem_ops > 0

def _rule_vs_ops(model, xb):
    "Rows whose rule MACs differ from the MACs of the aten ops the same call ran (one pass: ops are tallied for every unit)"
    with Counting(model) as c, torch.no_grad(): model(*xb)
    recs = c.records(warn=False)
    n_rule = sum(r.macs_src=='rule' for r in recs)
    bad = {r.name: (r.macs, t.macs, sorted(t.unknown)) for r,t in zip(recs, c.counter.fwd) if r.macs_src=='rule' and (t.unknown or r.macs!=t.macs)}
    return n_rule, bad

@pytest.mark.parametrize('name', TV_SIZES)
def test_rule_equals_ops_torchvision(name):
    "Every torchvision classification model on `meta`: each row counted by a rule runs aten ops with exactly the rule's MACs"
    _, model, xb, _ = build(name)
    n, bad = _rule_vs_ops(model, xb)
    assert n > 0 and not bad, f"{name}: rule vs ops {bad}"

@pytest.mark.parametrize('name', TIMM)
def test_rule_equals_ops_timm(name):
    timm = pytest.importorskip('timm')
    if name not in timm.list_models(): pytest.skip(f'{name} is not in timm {timm.__version__}')
    with torch.device('meta'): model = timm.create_model(name, pretrained=False).eval()
    n, bad = _rule_vs_ops(model, (torch.randn(1, *model.pretrained_cfg.get('input_size', (3,224,224)), device='meta'),))
    assert n > 0 and not bad, f"{name}: rule vs ops {bad}"

@pytest.mark.parametrize('grad', [True, False])
@pytest.mark.parametrize('kw', [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=3)])
@pytest.mark.parametrize('cls', [nn.LSTM, nn.GRU, nn.RNN])
def test_rnn_rule_equals_ops(cls, kw, grad):
    """The recurrent rule against the ops the same call ran: on CPU oneDNN's `mkldnn_rnn_layer` (LSTM; `mkldnn_rnn_layer_macs`),
    or the matmuls of the composite path (GRU, RNN, projected LSTM)"""
    if cls is not nn.LSTM and 'proj_size' in kw: pytest.skip('proj_size is LSTM only')
    torch.manual_seed(0)
    m, x = cls(4, 6, **kw), torch.randn(5, 3, 4)
    with Counting(m) as c, torch.set_grad_enabled(grad): m(x)
    r, t = c.records(warn=False)[0], c.counter.fwd[0]
    assert r.macs_src == 'rule'
    if t.unknown: pytest.skip(f'this torch runs {sorted(t.unknown)} for {cls.__name__}: no ops to compare')
    assert r.macs == t.macs

# --- 2. complex numbers: one complex MAC = 4 real MACs ---
def test_complex_linear_conv_matmul():
    torch.manual_seed(0)
    cf = torch.cfloat
    lin, x = nn.Linear(16, 4, bias=False, dtype=cf), torch.randn(8, 16, dtype=cf)
    r = rows(nn.Sequential(lin), x)['0']
    assert (r.macs, r.macs_src, r.complex_macs) == (4*8*16*4, 'rule', True) == (2048, 'rule', True)
    r = count_pass(nn.Sequential(lin), (x,), rules=False)[0]
    assert (r.macs, r.macs_src, r.complex_macs) == (2048, 'ops', True)   # the matmul it runs, counted from ops
    conv, xi = nn.Conv2d(2, 3, 3, dtype=cf), torch.randn(1, 2, 5, 5, dtype=cf)
    # torch convolves complex tensors as 3 real convolutions (Gauss's trick): the rule counts the 3 real MACs per complex MAC that run
    r = rows(nn.Sequential(conv), xi)['0']
    assert (r.macs, r.macs_src, r.complex_macs) == (3*(1*3*3*3 * 2*9), 'rule', True)
    r = count_pass(nn.Sequential(conv), (xi,), rules=False)[0]
    assert (r.macs, r.macs_src, r.complex_macs) == (3*(1*3*3*3 * 2*9), 'ops', True)
    class Mix(nn.Module):   # a Fourier layer's mode mixing: complex einsum over channels, complex matmul
        def __init__(self): super().__init__(); self.w = nn.Parameter(torch.randn(4, 6, 10, dtype=cf))
        def forward(self, x): return torch.einsum('bim,iom->bom', x, self.w) @ torch.randn(10, 3, dtype=cf)
    xm = torch.randn(2, 4, 10, dtype=cf)
    r = rows(Mix(), xm)['']
    assert (r.macs, r.complex_macs) == (4*(2*4*6*10 + 2*6*10*3), True)
    s = model_cost(nn.Sequential(lin), x, n_warmup=0, n_repeat=1)
    assert s.total_macs == 2048 and any('Complex tensors in 0' in n and '4 per complex' in n for n in s.notes)
    assert not any('Complex' in n for n in model_cost(nn.Linear(16, 4), torch.randn(8, 16), n_warmup=0, n_repeat=1).notes)
    assert rows(nn.Sequential(nn.Linear(16, 4)), torch.randn(8, 16))['0'].complex_macs is False

# --- 3. grad modes ---
class MatW(nn.Module):
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.randn(16, 4))
    def forward(self, x): return x @ self.w

def _modes(model, xb):
    """`(name, macs, macs_src, unknown_ops)` and `elem_ops` of every row under `inference_mode`, `no_grad` and with grad enabled.
    (Elementwise work can differ in inference mode: torch's `matmul` folds a batched input into one `mm` only where autograd runs, so it
    copies the input for a `bmm` instead; the MACs are the same.)"""
    res = {}
    for mode,ctx in [('inference', torch.inference_mode), ('no_grad', torch.no_grad), ('grad', torch.enable_grad)]:
        with ctx():
            xs = tuple(x.clone() for x in xb)   # inference tensors made outside would not mix with grad mode
            with Counting(model) as c: model(*xs)
        res[mode] = [(r.name, r.macs, r.macs_src, r.unknown_ops) for r in c.records(warn=False)]
        res[mode+'_elem'] = [r.elem_ops for r in c.records(warn=False)]
    return res

def _vit():
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=64, num_classes=10).eval(), (torch.randn(1, 3, 64, 64),)

# vit_tiny at 64 px, 10 classes: 16 patches + the class token = 17 tokens of 192; 12 blocks of 3 heads; MLP 768
VIT_HAND = 16*192*3*16*16 + 12*(17*192*3*192 + 2*3*17*17*64 + 17*192*192 + 2*17*192*768) + 192*10

@pytest.mark.parametrize('case', ['matmul', 'vit', 'cnn', 'lstm', 'transformer_train'])
def test_counts_same_in_every_grad_mode(case):
    torch.manual_seed(0)
    if case=='matmul': model, xb, hand = MatW(), (torch.randn(8, 16),), 8*16*4
    elif case=='vit':  (model, xb), hand = _vit(), VIT_HAND
    elif case=='cnn':  model, xb, hand = torchvision.models.resnet18().eval(), (torch.randn(1, 3, 64, 64),), None
    elif case=='lstm': model, xb, hand = nn.LSTM(8, 16, num_layers=2), (torch.randn(5, 2, 8),), 5*2*4*16*((8+16) + (16+16))
    else:              model, xb, hand = nn.TransformerEncoderLayer(16, 2, 32, dropout=0., batch_first=True), (torch.randn(2, 5, 16),), None
    res = _modes(model, xb)
    assert res['inference'] == res['no_grad'] == res['grad'], case
    assert res['no_grad_elem'] == res['grad_elem'], case
    assert not any(src=='uncounted' for _,_,src,_ in res['no_grad'])
    total = sum(m for _,m,_,_ in res['no_grad'])
    if hand is not None: assert total == hand
    if case in ('cnn', 'matmul'): assert total == fc_macs(model, *xb)   # (torch 2.14's flop_counter has no formula for the CPU attention kernel)

def test_model_cost_in_inference_mode():
    model, xb = _vit()
    ref = model_cost(model, *xb, n_warmup=0, n_repeat=1)
    with torch.inference_mode(): s = model_cost(model, *xb, n_warmup=0, n_repeat=1)
    assert s.total_macs == ref.total_macs == VIT_HAND == 93_936_000 and not s.uncounted

# --- 4. fast paths and nested tensors ---
def _encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1).eval(), torch.randn(2, 4, 8)

def test_hooks_switch_off_fast_path():
    """Dense, no mask: unhooked, the layer runs `_transformer_encoder_layer_fwd`; hooked, MHA and the linears.
    MACs by hand: per token 3·8·8 (in-projection) + 8·8 (out) + 2·8·16 (MLP) = 512; per sequence 2·4·4·8 for scores and values."""
    enc, x = _encoder()
    s = model_cost(enc, x, n_warmup=0, n_repeat=2)
    hand = 8*512 + 2*2*4*4*8
    assert s.total_macs == hand == 4608
    note = [n for n in s.notes if n.startswith('Hooks change what this model runs')]
    assert len(note)==1 and '_transformer_encoder_layer_fwd' in note[0] and f'{hand:,} MACs against {hand:,}' in note[0] and '(`plain_ms`)' in note[0]
    assert s.n_passes == 5 + 2*2   # the paths differ: after the counting pass and the names-only one, two unhooked (the same: no state) and the counting again; 2 hooked, 2 plain
    ops, t = plain_ops(enc, (x,))
    assert dict(ops) == {'_transformer_encoder_layer_fwd': 1} and t.macs == hand
    same = model_cost(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), x, n_warmup=0, n_repeat=1)
    assert not any(n.startswith('Hooks change') for n in same.notes) and same.n_passes == 2 + 2   # same path: the names-only pass settles it
    lazy = model_cost(nn.Sequential(nn.LazyLinear(8), nn.ReLU()), x, n_warmup=0, n_repeat=1)   # its initialisation in the first forward is no other path
    assert lazy.total_macs == 2*4*8*8 and not any(n.startswith('Hooks change') for n in lazy.notes)
    assert lazy.n_passes == 5 + 2   # the first forward's initialisation ops differ from the unhooked second's: both passes again, then the same

class _Alternating(nn.Module):
    "Adds a second layer on every other call: a forward that depends on its own state (review finding)"
    def __init__(self): super().__init__(); self.l1,self.l2,self.n = nn.Linear(16, 16),nn.Linear(16, 16),0
    def forward(self, x):
        self.n += 1; x = self.l1(x)
        return self.l2(x) if self.n%2==0 else x

def test_stateful_forward_is_not_blamed_on_hooks():
    "Its ops change from call to call without hooks too: the notes say so (not 'hooks change what this model runs'), the rows count the first call, the state is restored"
    m = _Alternating()
    s = model_cost(m, torch.randn(4, 16), n_repeat=2)
    assert not any(n.startswith('Hooks change') for n in s.notes) and any('from one call to the next' in n for n in s.notes)
    assert s.total_macs == 4*16*16 and m.n == 0 and s.n_passes == 4 + 2*2

def test_nested_padding_mask():
    """With `src_key_padding_mask` the unhooked encoder packs the 6 real tokens into a nested tensor:
    6·512 + 2·(4·4 + 2·2)·8 = 3,392 MACs (dense: 4,608). `FlopCounterMode` counts 0 for the nested kernel: the reference is the hand count."""
    enc, x = _encoder()
    mask = torch.tensor([[False]*4, [False, False, True, True]])
    hand = 6*512 + 2*(4*4 + 2*2)*8
    ops, t = plain_ops(enc, (x,), dict(src_key_padding_mask=mask))
    assert t.macs == hand == 3392 and '_transformer_encoder_layer_fwd' in ops
    with torch.no_grad(): ref = enc(x, src_key_padding_mask=mask)
    s = model_cost(enc, x, model_kwargs=dict(src_key_padding_mask=mask), n_warmup=0, n_repeat=2)
    assert s.total_macs == hand and not s.uncounted
    assert s.df.set_index('name').loc['layers.0.self_attn', 'macs'] == 6*4*8*8 + 2*(16+4)*8
    assert any(n.startswith('Hooks change what this model runs') and '3,392 MACs against 3,392' in n for n in s.notes)
    with torch.no_grad(): assert torch.equal(enc(x, src_key_padding_mask=mask), ref)   # model untouched, no hooks left
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in enc.modules())

# --- 5. dynamic-quantized models ---
def _quantize(m, types):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.ao.quantization.quantize_dynamic(m, types, dtype=torch.qint8)

def test_quantized_linear():
    torch.manual_seed(0)
    q = _quantize(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), {nn.Linear})
    s = model_cost(q, torch.randn(3, 16), n_warmup=0, n_repeat=1)
    assert s.total_params == (16*8 + 8) + (8*4 + 4) == 172
    assert s.total_macs == 3*(16*8 + 8*4) and not s.uncounted
    assert not [n for n in s.uncalled if 'packed' in n]
    assert s.df.set_index('name').loc['0', 'param_bytes'] == 16*8*1 + 8*4   # int8 weight, float bias

def test_quantized_lstm():
    "LSTM(4, 8), 2 layers, bidirectional: the parameters of the float LSTM; MACs of the recurrent rule (steps · gates·h·(in+h), per layer and direction)"
    torch.manual_seed(0)
    f = nn.LSTM(4, 8, num_layers=2, bidirectional=True)
    q = _quantize(nn.Sequential(f), {nn.LSTM})
    x = torch.randn(5, 3, 4)
    hand_p = 2*(4*32 + 8*32 + 2*32) + 2*(16*32 + 8*32 + 2*32)
    hand_m = 15*2*32*(4+8) + 15*2*32*(16+8)
    assert sum(p.numel() for p in f.parameters()) == hand_p == 2560
    s = model_cost(q, x, n_warmup=0, n_repeat=1)
    assert (s.total_params, s.total_macs) == (hand_p, hand_m) == (2560, 34_560)
    assert not s.uncounted and not s.uncalled

def test_rule_gives_way_to_what_ran():
    "Work a stock layer does through a forward hook, an instance `_conv_forward` or a computed `weight` is counted from its ops"
    import torch.nn.functional as F
    c = nn.Conv2d(3,4,3,padding=1)
    c._conv_forward = lambda x,w,b: F.conv2d(x,w,b,1,1) + F.conv2d(x,w,None,1,1)
    r = count_pass(nn.Sequential(c), (torch.randn(2,3,8,8),))[0]
    assert (r.macs, r.macs_src) == (2*2*4*8*8*27, 'ops')   # two convolutions, hand count 27,648
    l = nn.Linear(16,16); l.register_forward_hook(lambda m,a,o: o @ m.weight)
    assert count_pass(nn.Sequential(l), (torch.randn(4,16),))[0].macs == 2*4*16*16
    class WP(nn.Linear):
        def __init__(s, i, o, r=4): super().__init__(i, o); s.w0,s.w1 = nn.Parameter(torch.randn(o, r)),nn.Parameter(torch.randn(r, i))
        @property
        def weight(self): return self.w0 @ self.w1
        @weight.setter
        def weight(self, v): pass
    m = nn.Sequential(WP(16,16)); x = torch.randn(4,16)
    with FlopCounterMode(display=False) as fc: m(x)
    assert count_pass(m, (x,))[0].macs == fc.get_total_flops()//2 == 16*4*16 + 4*16*16

def test_count_pass_backward_reentrant_checkpoint():
    "`count_pass(backward=True)` runs the backward of a reentrant checkpoint (autograd.grad ran none, silently), and leaves `.grad` as it was"
    from torch.utils.checkpoint import checkpoint
    class M(nn.Module):
        def __init__(s): super().__init__(); s.a,s.b = nn.Linear(16,16),nn.Linear(16,8)
        def forward(s, x): return checkpoint(lambda t: s.b(s.a(t)), x, use_reentrant=True)
    m,x = M(),torch.randn(4,16, requires_grad=True)
    recs = {r.name: r for r in count_pass(m, (x,), backward=True)}
    assert (recs['a'].bwd_macs, recs['a'].recompute_macs) == (3*4*16*16, 4*16*16)   # input and weight gradients, and the recompute
    assert (recs['b'].bwd_macs, recs['b'].recompute_macs) == (3*4*16*8, 4*16*8)
    assert x.grad is None and all(p.grad is None for p in m.parameters())
