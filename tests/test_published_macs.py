"""Independent references for cnn_cost's MAC counts.

- torchvision's published GFLOPS (`weights.meta['_ops']`, in GMACs despite the name: the figure `torch.utils.flop_counter` / 2 gives)
  for a spread of architectures at their reference resolution, batch 1, eval mode, no weights downloaded. MACs depend on shapes only,
  so these models are built on the `meta` device (no memory, no compute: the whole spread counts in seconds on 2 cores);
  `test_real_equals_meta` checks that real tensors with random weights give the same counts, fused fast paths included;
- `torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2) on the same batch;
- the seed's figure, resnet18 in a fastai `vision_learner` on 64 x 3 x 28 x 28: 2,224,930,816;
- `nn.MultiheadAttention`, whose eval-mode fast path runs one fused `aten._native_multi_head_attention`, against a hand count."""
import pytest, torch, torch.nn as nn, torchvision
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode
from cnn_cost.all import *
from cnn_cost.counting import count_pass

# name: kind of architecture. torchvision publishes `_ops` rounded to 3 decimals of GFLOPS, well inside 1% for all of these.
ARCHS = {'vgg11': 'plain', 'alexnet': 'plain', 'resnet18': 'residual', 'resnet50': 'residual', 'mobilenet_v2': 'depthwise',
         'mobilenet_v3_small': 'depthwise + squeeze-excite', 'efficientnet_b0': 'depthwise + squeeze-excite', 'resnext50_32x4d': 'grouped',
         'regnet_y_400mf': 'grouped + squeeze-excite', 'shufflenet_v2_x1_0': 'grouped + channel shuffle', 'densenet121': 'dense',
         'googlenet': 'multi-branch', 'convnext_tiny': 'depthwise 7x7 + LayerNorm + Linear on NHWC', 'vit_b_16': 'attention (nn.MultiheadAttention)',
         'swin_t': 'attention (F.linear inside modules, shifted windows)'}
TRANSFORMERS = {'vit_b_16', 'swin_t'}

def total_macs(model, xb): return sum(r.macs for r in count_pass(model, xb))
def fc_macs(model, xb):
    "MACs by `torch.utils.flop_counter` (FLOPs / 2)"
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model(*xb)
    return fc.get_total_flops()//2

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

@pytest.mark.parametrize('name', torchvision.models.list_models(module=torchvision.models))
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
            ref = fc_macs(model, xb)
        finally: model.eval()
    else: ref = fc_macs(model, xb)
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
    from fastai.vision.all import vision_learner, resnet18
    learn = vision_learner(digits_dls(), resnet18, pretrained=False, n_out=10)
    xb = learn.dls.train.one_batch()[:1]
    model = learn.model.eval()
    assert tuple(xb[0].shape) == (64, 3, 28, 28)
    macs = total_macs(model, xb)
    assert macs == 2_224_930_816
    assert fc_macs(model, xb) == macs
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
TIMM = ['resnet50d', 'efficientnet_b0', 'mobilenetv3_small_100', 'mobilenetv4_conv_small', 'convnext_atto', 'convnextv2_atto', 'vit_tiny_patch16_224',
        'deit_tiny_patch16_224', 'swin_tiny_patch4_window7_224', 'swinv2_tiny_window8_256', 'beit_base_patch16_224', 'eva02_tiny_patch14_224',
        'levit_128s', 'maxvit_tiny_tf_224', 'coatnet_0_rw_224', 'convit_tiny', 'mixer_b16_224', 'poolformer_s12', 'efficientformer_l1', 'regnety_002',
        'xception41', 'ghostnet_100', 'cait_xxs24_224', 'crossvit_tiny_240', 'pvt_v2_b0', 'mobilevit_xxs', 'edgenext_xx_small', 'fastvit_t8',
        'repvit_m1', 'tiny_vit_5m_224', 'hiera_tiny_224', 'vit_small_patch16_rope_224']

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
