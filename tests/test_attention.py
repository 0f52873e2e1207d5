"""Attention MACs, forward and backward, on the installed torch: every SDPA variant a model can ask for on CPU, checked against a hand
count and against `torch.utils.flop_counter` wherever it has a formula; every kernel formula against torch's own where both exist."""
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
