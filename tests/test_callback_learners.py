"""Every kind of fastai learner, on small in-memory data, through `cost_summary` and `CostProfiler`.

Each test checks the rows, the parameters (each counted once: the rows plus the never-called modules' own parameters make the model's),
the MACs against an independent count — `torch.utils.flop_counter` where it can count the model, a hand count where it cannot
(fused LSTM kernels; attention kernels that the installed torch's `flop_counter` does not know) — and that no hook is left behind."""
import math, pytest, torch, torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from cnn_cost.all import *
from cnn_cost.callback import CostProfiler
from conftest import hook_count
import kinds

def xb_of(learn): return tuple(learn.dls.train.one_batch()[:learn.dls.train.n_inp])

def fc_macs(model, xb, backward=False, skip=()):
    "MACs by `flop_counter` (FLOPs / 2) of a forward (eval, no grad), or of a training forward and backward; minus those inside `skip` modules"
    with FlopCounterMode(display=False) as fc:
        if backward:
            out = model.train()(*xb)
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()
        else:
            with torch.no_grad(): model.eval()(*xb)
    counts = fc.get_flop_counts()
    inside = sum(sum(v.values()) for k,v in counts.items() if any(k.endswith(s) for s in skip))
    return (fc.get_total_flops() - inside)//2

def lstm_hand(model, xb):
    "MACs of every `nn.LSTM` call in a forward, by hand: 4 gates x hidden x (input + hidden) per step, layer and direction"
    res = []
    def hook(m, args, out): res.append(4*m.hidden_size*(m.input_size+m.hidden_size)*math.prod(args[0].shape[:-1])*m.num_layers)
    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.LSTM)]
    try:
        with torch.no_grad(): model.eval()(*xb)
    finally:
        for h in hs: h.remove()
    return sum(res)

def lstm_names(model): return [n for n,m in model.named_modules() if isinstance(m, nn.LSTM)]

def check_params(model, cs):
    "Each parameter once: the rows' and the never-called modules' own add up to the model's"
    n = sum(p.numel() for p in model.parameters())  # `parameters()` lists a shared parameter once
    assert cs.total_params + cs.uncalled_params == n, (cs.total_params, cs.uncalled_params, n)

def check_clean(model, before=0): assert hook_count(model) == before

def profile(learn, **kw):
    "Fit one short epoch with a `CostProfiler` passed to `fit`, as a user would; the profile outlives the callback"
    learn.fit(1, 1e-3, cbs=CostProfiler(skip=1, n_batches=2, **kw))
    assert not hasattr(learn, 'cost_profiler')   # fastai removed it at the end of fit...
    return learn.train_profile.summary()          # ...the profile stays

def test_tabular():
    learn = kinds.tabular()
    xb,model = xb_of(learn),learn.model
    cs = learn.cost_summary(n_repeat=2)
    check_params(model, cs); check_clean(model)
    assert cs.total_macs == fc_macs(model, xb) > 0 and not cs.uncounted
    assert set(cs.df.stage_label) == {'flat'}
    s = profile(learn)
    assert (s.df.bwd_macs.sum() + s.total_macs) == fc_macs(model, xb, backward=True)
    assert (s.df[s.df.type=='Linear'].bwd_ms > 0).all(); check_clean(model)

@pytest.mark.parametrize('kind', ['classifier', 'language_model'])
def test_awd_lstm(kind):
    learn = kinds.text_classifier() if kind=='classifier' else kinds.language_model()
    xb,model = xb_of(learn),learn.model
    cs = learn.cost_summary(n_repeat=2)
    check_params(model, cs); check_clean(model)
    df = cs.df.set_index('name')
    # the embedding's weight is used through EmbeddingDropout: that row holds it; the embedding module itself never runs
    enc = next(n for n in cs.uncalled if n.endswith('encoder'))
    emb = dict(model.named_modules())[enc]
    assert df.loc[enc+'_dp', 'params'] == emb.weight.numel() and df.loc[enc+'_dp', 'elem_ops'] > 0
    assert f'{enc} (parameters used by {enc}_dp)' in str(cs)
    # MACs: the fused LSTM kernel has no formula, so LSTM rows come from the layer rule, checked against a hand count; the rest by flop_counter
    hand = lstm_hand(model, xb)
    assert df[df.type=='LSTM'].macs.sum() == hand > 0
    assert cs.total_macs == hand + fc_macs(model, xb, skip=lstm_names(model))
    assert not cs.uncounted
    # stages are blocks (rnns.0, rnns.1) and sequence lengths, not channel counts
    labels = list(cs.stages().stage_label)
    assert 'rnns.0' in labels and 'rnns.1' in labels and not any(l.isdigit() for l in labels) and len(labels) <= 8, labels
    if kind=='language_model':
        dec = df[df.type=='Linear'].iloc[-1]
        assert dec.shared_params == emb.weight.numel() and dec.shared_with == enc+'_dp'   # the decoder is tied to the embedding
        assert cs.total_params == sum(p.numel() for p in model.parameters()) < df.params.sum()
    s = profile(learn)
    lstm = s.df[s.df.type=='LSTM']
    assert (lstm.bwd_src == 'rule').all() and (lstm.bwd_macs == 2*lstm.macs).all()  # input and weight gradients of every gate
    assert (s.df[s.df.type=='Linear'].bwd_macs > 0).all() and (lstm.bwd_ms > 0).all()
    check_clean(model)

def test_unet():
    learn = kinds.unet()
    xb,model = xb_of(learn),learn.model
    own = hook_count(model)   # DynamicUnet keeps forward hooks of its own on the encoder (its skip connections)
    assert own > 0
    with torch.no_grad(): y0 = model.eval()(*xb)
    cs = learn.cost_summary(n_repeat=2)
    with torch.no_grad(): y1 = model.eval()(*xb)
    assert torch.equal(y0, y1) and hook_count(model) == own
    check_params(model, cs)
    assert cs.total_macs == fc_macs(model, xb) and not cs.uncounted
    labels = list(cs.stages().stage_label)
    assert labels[0] == '16x16' and labels[-1] == '32x32'   # down the encoder, up the decoder
    s = profile(learn)
    assert s.df.bwd_macs.sum() + s.total_macs == fc_macs(model, xb, backward=True)
    assert hook_count(model) == own

@pytest.mark.parametrize('use_nn', [False, True])
def test_collab(use_nn):
    learn = kinds.collab(use_nn)
    xb,model = xb_of(learn),learn.model
    cs = learn.cost_summary(n_repeat=2)
    check_params(model, cs); check_clean(model)
    # the dot model multiplies and sums factors elementwise: no matmul, no MAC by flop_counter's convention either
    assert cs.total_macs == fc_macs(model, xb) and (cs.total_macs > 0) == use_nn and cs.total_elem_ops > 0
    s = profile(learn)
    assert s.df.bwd_macs.sum() + s.total_macs == fc_macs(model, xb, backward=True)
    assert (s.df[s.df.type=='Embedding'].bwd_ms > 0).all(); check_clean(model)

def test_timm_convnext():
    learn = kinds.timm_vision('convnext_atto', 64)
    xb,model = xb_of(learn),learn.model
    cs = learn.cost_summary(n_repeat=2)
    check_params(model, cs); check_clean(model)
    assert cs.uncalled_params > 0 and 'not in the totals' in str(cs)   # fastai cuts timm's own head off: never called
    assert cs.total_macs == fc_macs(model, xb) and not cs.uncounted
    s = profile(learn)
    assert s.df.bwd_macs.sum() + s.total_macs == fc_macs(model, xb, backward=True)
    check_clean(model)

def vit_attention_hand(model, xb, backward=False):
    "MACs of every timm `Attention`'s scores and weighted values, by hand; the backward recomputes the scores (flop_counter's convention)"
    res = []
    def hook(m, args, out):
        b,l,_ = args[0].shape
        res.append(b*m.num_heads*l*l*m.head_dim*(5 if backward else 2))
    hs = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__=='Attention']
    try:
        with torch.no_grad(): model.eval()(*xb)
    finally:
        for h in hs: h.remove()
    return sum(res), len(hs)

@pytest.mark.slow  # a timm ViT trained with the profiler; tests/test_counting.py counts every timm family in the default set
def test_timm_vit():
    learn = kinds.timm_vision('vit_tiny_patch16_224', 224, bs=2, n=8)
    xb,model = xb_of(learn),learn.model
    cs = learn.cost_summary(n_repeat=1, n_warmup=0)
    check_params(model, cs); check_clean(model)
    attn,n = vit_attention_hand(model, xb)
    rows = cs.df[(cs.df.type=='Attention') & (cs.df.kind=='own')]
    assert n == len(rows) == 12 and rows.macs.sum() == attn and not cs.uncounted
    # the attention kernel is fused (flash on CPU): flop_counter counts it only on torch versions that know it; its math fallback
    # decomposes into matmuls that every version counts, and gives the forward's reference
    from torch.nn.attention import sdpa_kernel, SDPBackend
    with sdpa_kernel(SDPBackend.MATH): ref = fc_macs(model, xb)
    assert cs.total_macs == ref
    labels = list(cs.stages().stage_label)
    # patches (14x14 map, then 196 tokens, 197 with the class token), one stage per block, the final norm, the head
    assert labels == ['14x14', 'seq 196', 'seq 197', *[f'blocks.{i}' for i in range(12)], 'seq 197', 'flat'], labels
    s = profile(learn)
    battn,_ = vit_attention_hand(model, xb, backward=True)
    known = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_registry
    ref = fc_macs(model, xb, backward=True) + (0 if known else attn + battn)
    assert s.df.bwd_macs.sum() + s.total_macs == ref
    assert s.df[(s.df.type=='Attention') & (s.df.kind=='own')].bwd_macs.sum() == battn
    check_clean(model)

def test_timm_vit_wrong_size():
    learn = kinds.timm_vision('vit_tiny_patch16_224', 28, bs=2, n=8)
    with pytest.raises(ValueError, match=r'built for 224 x 224 images and the batch is 28 x 28: resize the data'): learn.cost_summary()
    check_clean(learn.model)

def test_lazy_module():
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    x = torch.randn(64, 5); y = (x.sum(1) > 0).long()
    dls = DataLoaders.from_dsets(list(zip(x,y)), list(zip(x,y))[:16], bs=16)
    learn = Learner(dls, nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2)), loss_func=nn.CrossEntropyLoss())
    cs = learn.cost_summary(n_repeat=1)
    assert cs.total_params == 5*8+8 + 8*2+2 and cs.total_macs == 16*(5*8+8*2) and 'Lazy modules initialised' in str(cs)
    check_clean(learn.model)
