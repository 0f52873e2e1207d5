"""Fake equals real, over a corpus: the memory prediction (CPU target, fake tensors) against real CPU training steps, for every torchvision
classification model, the timm families the counting tests use, the RNN family, attention, and each fastai learner kind of tests/kinds.py.
Three references per model (tests/memory_refs.py, `corpus_check`): saved-for-backward bytes seen by saved-tensor hooks, the peak of
PyTorch's `MemTracker` over a real step, and the bytes of every kind in cnn_cost's own real step (`fake=False`). Writes
bench/out/memory_corpus.json and .md (for BENCHMARKS.md).
    python bench/memory_corpus.py             # everything (tens of minutes on 2 cores)
    python bench/memory_corpus.py rnn attn    # the cases whose name contains one of the words
    python bench/memory_corpus.py timm_ --out part2   # a part of the run in a process of its own, written to bench/out/part2.json
    python bench/memory_corpus.py --table memory_corpus part2   # the .md of one run from the .json its parts wrote (cases not reached are listed)
The CI-sized subset runs in tests/test_memory_corpus.py (`CI`); the whole corpus there is marked slow."""
import sys, json, time, gc, warnings, platform
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent/'tests'))
warnings.filterwarnings('ignore')
import torch, torch.nn as nn, torch.nn.functional as F, torchvision
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from fastai.optimizer import SGD
from memory_refs import corpus_check, op_mismatches
from cnn_cost.fake import fake_fixes

BIG = 150e6  # parameters: models above this are not run for real here (the references need three real copies of the weights, on a shared 23 GB machine)
HEAVY = 60e6  # above this the step uses SGD without momentum (no optimizer state), to keep the real runs in memory

class Seq(nn.Module):
    "An RNN (`packed`: on a packed, padded batch of lengths `T, T-1, ...`) and a linear head on its outputs"
    def __init__(self, rnn, packed=False):
        super().__init__(); self.rnn,self.packed = rnn,packed
        self.head = nn.Linear((rnn.proj_size or rnn.hidden_size) if isinstance(rnn, nn.LSTM) else rnn.hidden_size, 1) if not rnn.bidirectional else \
                    nn.Linear(2*((rnn.proj_size or rnn.hidden_size) if isinstance(rnn, nn.LSTM) else rnn.hidden_size), 1)
    def forward(self, x):
        if not self.packed: return self.head(self.rnn(x)[0])
        lens = torch.arange(x.shape[1], x.shape[1]-x.shape[0], -1).clamp(min=1)
        o,_ = pad_packed_sequence(self.rnn(pack_padded_sequence(x, lens, batch_first=True))[0], batch_first=True, total_length=x.shape[1])
        return self.head(o)

class MHA(nn.Module):
    def __init__(self, e=32, h=4, mask=False): super().__init__(); self.attn,self.mask = nn.MultiheadAttention(e, h, batch_first=True),mask
    def forward(self, x):
        m = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1) if self.mask else None
        return self.attn(x, x, x, attn_mask=m, need_weights=False)[0]

class SDPA(nn.Module):
    def __init__(self, e=32, h=4, causal=False): super().__init__(); self.qkv,self.out,self.h,self.causal = nn.Linear(e, 3*e),nn.Linear(e, e),h,causal
    def forward(self, x):
        b,l,e = x.shape
        q,k,v = self.qkv(x).view(b, l, 3, self.h, e//self.h).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2).reshape(b, l, e))

def _seq(rnn, packed=False, b=4, t=12, i=8): return lambda: (Seq(rnn(), packed), torch.randn(b, t, i), torch.randn(b, t, 1), nn.MSELoss())
def _attn(m, b=2, l=16, e=32): return lambda: (m(), torch.randn(b, l, e), torch.randn(b, l, e), nn.MSELoss())

RNN = {'lstm': _seq(lambda: nn.LSTM(8, 16, batch_first=True)), 'lstm_issue17': lambda: (Seq(nn.LSTM(64, 256, batch_first=True)), torch.randn(32, 64, 64), torch.randn(32, 64, 1), nn.MSELoss()),
       'lstm_2layer': _seq(lambda: nn.LSTM(8, 16, 2, batch_first=True)), 'lstm_bidir': _seq(lambda: nn.LSTM(8, 16, batch_first=True, bidirectional=True)),
       'lstm_2layer_bidir_dropout': _seq(lambda: nn.LSTM(8, 16, 2, batch_first=True, bidirectional=True, dropout=0.1)),
       'lstm_seq_first': lambda: (nn.Sequential(nn.LSTM(8, 16), _First(), nn.Linear(16, 1)), torch.randn(12, 4, 8), torch.randn(12, 4, 1), nn.MSELoss()),
       'lstm_proj': _seq(lambda: nn.LSTM(8, 16, batch_first=True, proj_size=4)), 'lstm_packed': _seq(lambda: nn.LSTM(8, 16, batch_first=True), packed=True),
       'gru': _seq(lambda: nn.GRU(8, 16, batch_first=True)), 'gru_2layer_bidir': _seq(lambda: nn.GRU(8, 16, 2, batch_first=True, bidirectional=True)),
       'gru_packed': _seq(lambda: nn.GRU(8, 16, batch_first=True), packed=True),
       'rnn_tanh': _seq(lambda: nn.RNN(8, 16, batch_first=True)), 'rnn_relu_2layer_bidir': _seq(lambda: nn.RNN(8, 16, 2, nonlinearity='relu', batch_first=True, bidirectional=True)),
       'lstm_cell': lambda: (_CellLoop(), torch.randn(4, 12, 8), torch.randn(4, 16), nn.MSELoss())}

class _First(nn.Module):
    def forward(self, o): return o[0]

class _CellLoop(nn.Module):
    def __init__(self): super().__init__(); self.cell = nn.LSTMCell(8, 16)
    def forward(self, x):
        h = c = torch.zeros(x.shape[0], 16)
        for t in range(x.shape[1]): h,c = self.cell(x[:, t], (h, c))
        return h

ATTN = {'mha': _attn(MHA), 'mha_masked': _attn(lambda: MHA(mask=True)), 'sdpa': _attn(SDPA), 'sdpa_causal': _attn(lambda: SDPA(causal=True)),
        'transformer_encoder_layer': _attn(lambda: nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)),
        'transformer_decoder_layer': lambda: (_Dec(), torch.randn(2, 16, 32), torch.randn(2, 16, 32), nn.MSELoss())}

class _Dec(nn.Module):
    def __init__(self): super().__init__(); self.d = nn.TransformerDecoderLayer(32, 4, 64, batch_first=True)
    def forward(self, x): return self.d(x, x)

def _tv_size(name):
    if name.startswith('vit_') or name=='maxvit_t': return 224
    if name=='inception_v3': return 96
    return 64

def _tv(name):
    def make():
        kw = dict(aux_logits=False, init_weights=False) if name in ('googlenet', 'inception_v3') else {}
        torch.manual_seed(0)
        m = torchvision.models.get_model(name, weights=None, num_classes=10, **kw)
        s = _tv_size(name)
        return m, torch.randn(2, 3, s, s), torch.tensor([1, 7]), nn.CrossEntropyLoss()
    return make

def _timm(name):
    def make():
        import timm
        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False, num_classes=10)
        return m, torch.randn(2, *m.default_cfg['input_size']), torch.tensor([1, 7]), nn.CrossEntropyLoss()
    return make

def _kind(make_learner):
    def make():
        import kinds
        learn = make_learner(kinds)
        b = learn.dls.train.one_batch(); n = learn.dls.train.n_inp
        from cnn_cost.memory import learner_loss
        return learn.model, tuple(b[:n]), tuple(b[n:]), learner_loss(learn), learn.opt_func  # the loss as fastai's callbacks feed it
    return make

def _vision_tiny():
    "A fastai vision model in small: a `TensorImage` batch, batch norms, in-place ReLUs on fastai's aliases, fastai's Adam"
    from fastai.torch_core import TensorImage, TensorCategory
    from fastai.layers import AdaptiveConcatPool2d
    from fastai.losses import CrossEntropyLossFlat
    from fastai.optimizer import Adam
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                      AdaptiveConcatPool2d(), nn.Flatten(), nn.Linear(16, 3))
    return m, TensorImage(torch.randn(2, 3, 12, 12)), TensorCategory(torch.tensor([0, 2])), CrossEntropyLossFlat(), Adam

def _unet_typed():
    "fastai's U-Net on fastai's typed batches (`TensorImage`, `TensorMask`) as the model gets them without `CastToTensor`: every op's output an alias"
    from memory_refs import typed_unet
    from cnn_cost.memory import learner_loss
    learn = typed_unet(bs=2, size=32)
    b = learn.dls.train.one_batch()
    return learn.model, b[:1], b[1:], learner_loss(learn), learn.opt_func

KINDS = {'fastai_vision_tiny': _vision_tiny, 'fastai_unet_typed': _unet_typed, 'fastai_tabular': _kind(lambda k: k.tabular()),
         'fastai_text_classifier': _kind(lambda k: k.text_classifier()),
         'fastai_language_model': _kind(lambda k: k.language_model()), 'fastai_unet': _kind(lambda k: k.unet()),
         'fastai_collab': _kind(lambda k: k.collab()), 'fastai_collab_nn': _kind(lambda k: k.collab(use_nn=True)),
         'fastai_vision_timm_resnet18': _kind(lambda k: k.timm_vision('resnet18', 32))}

def _timm_names():
    from kinds import TIMM
    return TIMM

def cases():
    "Name -> a function making `(model, xb, yb, loss_func[, opt_func])`, for the whole corpus"
    res = {**RNN, **ATTN, **KINDS}
    res.update({f'tv_{n}': _tv(n) for n in torchvision.models.list_models(module=torchvision.models)})
    res.update({f'timm_{n}': _timm(n) for n in _timm_names()})
    return res

# the CI-sized subset (tests/test_memory_corpus.py): each family once, every fix exercised, small inputs
CI = ['lstm', 'lstm_issue17', 'lstm_2layer_bidir_dropout', 'lstm_proj', 'gru_2layer_bidir', 'rnn_relu_2layer_bidir', 'lstm_cell', 'mha_masked', 'sdpa_causal',
      'transformer_encoder_layer', 'fastai_vision_tiny', 'fastai_language_model', 'fastai_tabular', 'fastai_collab_nn', 'tv_resnet18', 'tv_mobilenet_v3_small',
      'tv_squeezenet1_1', 'timm_convnext_atto', 'fastai_unet_typed']
# cases no fake step can predict: an op needs the data's values; the prediction stops with a clear error naming the op
UNPREDICTABLE = {'lstm_packed': '_pack_padded_sequence', 'gru_packed': '_pack_padded_sequence', 'fastai_text_classifier': '_local_scalar_dense'}

def run(name, make):
    "One corpus row: the checks of `corpus_check`, or why it was not run"
    t = time.perf_counter()
    try:
        args = make()
        n = sum(p.numel() for p in args[0].parameters())
        if n > BIG: return dict(name=name, params=n, skipped=f'{n/1e6:.0f}M parameters: too large for real runs on this machine')
        opt = args[4] if len(args)>4 else (SGD if n > HEAVY else None)
        del args
        res = corpus_check(name, make, opt)
        res.update(params=n, opt=getattr(opt, '__name__', 'Adam') if opt else 'Adam', torch_fake_ops=op_mismatches(make, opt))
        res['unfixed'] = [k for k in res['torch_fake_ops'] if k.rsplit('.', 1)[0] not in {str(o) for o in fake_fixes}]
    except Exception as e: res = dict(name=name, error=f'{type(e).__name__}: {str(e)[:300]}')
    res['s'] = round(time.perf_counter()-t, 1)
    gc.collect()
    return res

def equal(r):
    "Whether a row is equal to the byte on all three references"
    return 'pred_saved' in r and r['pred_saved']==r['real_saved'] and r['pred_peak']==r['real_peak'] and r['kinds_equal'] and not r.get('ops_diff')

def table(rows, todo=()):
    ok = [r for r in rows if equal(r)]
    ran = [r for r in rows if 'pred_saved' in r]
    res = [f"torch {torch.__version__}, torchvision {torchvision.__version__}, {platform.processor() or platform.machine()}: {len(rows)} models, "
           f"{len(ran)} run for real, {len(ok)} equal to the byte (saved bytes, peak, every kind)", '',
           '| model | params | saved predicted | saved real (hooks) | peak predicted | peak real (MemTracker) | equal | fake kernels fixed / flagged |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        if 'pred_saved' not in r: res.append(f"| {r['name']} | {r.get('params', 0)/1e6:.1f}M | | | | | not run | {r.get('skipped') or r.get('error')} |"); continue
        fixed = sorted({k.rsplit('.', 1)[0].replace('aten.', '') for k in r.get('torch_fake_ops', {}) if k not in r.get('unfixed', [])})
        note = '; '.join(filter(None, [f"flagged: {', '.join(r['flags'])}" if r['flags'] else '', f"fixed: {', '.join(fixed)}" if fixed else '',
                                       f"torch fake differs, not fixed: {', '.join(r['unfixed'])}" if r.get('unfixed') else '',
                                       f"blocks by op differ: {r['ops_diff']}" if r.get('ops_diff') else '']))
        res.append(f"| {r['name']} | {r['params']/1e6:.1f}M | {r['pred_saved']:,} | {r['real_saved']:,} | {r['pred_peak']:,} | {r['real_peak']:,} | "
                   f"{'yes' if equal(r) else 'NO'} | {note} |")
    left = [k for k in todo if k not in {r['name'] for r in rows}]
    if left: res += ['', f"Not reached by this run ({len(left)}; `python bench/memory_corpus.py NAME` runs one): {', '.join(left)}"]
    return '\n'.join(res)

if __name__=='__main__':
    args = sys.argv[1:]
    out = Path(__file__).parent/'out'; out.mkdir(exist_ok=True)
    i = args.index('--out') if '--out' in args else None
    name = args[i+1] if i is not None else 'memory_corpus'  # a part of one run, in a process of its own
    words = [a for j,a in enumerate(args) if not a.startswith('--') and (i is None or j!=i+1)]
    if '--table' in args:  # the table of one run from the .json files its parts wrote (names after `--table`; default: memory_corpus)
        rows = [r for f in (words or ['memory_corpus']) for r in json.loads((out/f'{f}.json').read_text())]
        order = list(cases())
        rows = sorted({r['name']: r for r in rows}.values(), key=lambda r: order.index(r['name']) if r['name'] in order else len(order))
        md = table(rows, order)
        (out/'memory_corpus.md').write_text(md + '\n'); print(md); sys.exit()
    todo = {k: v for k,v in cases().items() if not words or any(w in k for w in words)}
    rows = []
    for k,v in todo.items():
        rows.append(run(k, v)); print(json.dumps(rows[-1]), flush=True)
        (out/f'{name}.json').write_text(json.dumps(rows, indent=1))
    md = table(rows)
    (out/f'{name}.md').write_text(md + '\n'); print(md)
