"""Fake equals real over a corpus (bench/memory_corpus.py): the predicted step (CPU target, fake tensors) against real CPU steps, equal to the byte:
saved bytes (saved-tensor hooks), peak (`MemTracker`), every kind and every op's bytes (cnn_cost's own real step), and no op whose torch fake kernel
differs from the real one without a `fake_fix`. The CI-sized subset runs always; the whole corpus (every torchvision classification model, the timm
families, ...) is marked slow: `pytest -m slow tests/test_memory_corpus.py`, or `python bench/memory_corpus.py` for the table in BENCHMARKS.md."""
import sys, pytest, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent/'bench'))
from memory_corpus import cases, run, CI, UNPREDICTABLE
from conftest import heavy

ALL = cases()

# torch 2.11 only: the real in-place gate ops of an RNN cell (and mse_loss) return a storage larger than the fake kernel's (832 B vs 1024 B: the
# whole gates buffer); saved bytes and the peak are still equal to the byte there, so only the op-by-op storage check allows them
OLD,OLD_OPS = tuple(int(v) for v in torch.__version__.split('.')[:2]) < (2,14),{'aten.sigmoid_.default', 'aten.detach.default', 'aten.add_.Tensor', 'aten.mse_loss.default'}

def check(name):
    r = run(name, ALL[name])
    if name in UNPREDICTABLE:
        assert 'could not run on fake tensors' in r['error'] and UNPREDICTABLE[name] in r['error']; return
    if 'skipped' in r: pytest.skip(r['skipped'])
    assert 'error' not in r, r['error']
    assert r['pred_saved'] == r['real_saved'], r
    assert r['pred_peak'] == r['real_peak'], r
    assert [o for o in r['unfixed'] if not (OLD and o in OLD_OPS)] == [], f"torch's fake kernels differ from the real ones with no fake_fix: {r['torch_fake_ops']}"
    assert r['kinds_equal'] and not r['ops_diff'], r

# the heavier half of the CI subset (real steps of full-size CNNs, the typed U-Net) runs with the slow set
@pytest.mark.parametrize('name', heavy(CI + ['lstm_packed', 'fastai_text_classifier'], ('tv_mobilenet_v3_small', 'tv_squeezenet1_1', 'timm_convnext_atto', 'fastai_unet_typed', 'lstm_issue17', 'gru_2layer_bidir', 'rnn_relu_2layer_bidir', 'lstm_cell')))
def test_corpus(name): check(name)

@pytest.mark.slow
@pytest.mark.parametrize('name', [n for n in ALL if n not in CI and n not in ('lstm_packed', 'fastai_text_classifier')])
def test_corpus_all(name): check(name)

def test_fastai_views_changed_in_place():
    """Every op on a fastai `TensorBase` returns an alias, so an in-place ReLU acts on a view: the real step's backward copies the gradient (`CopySlices`)
    and its `AsStridedBackward0` allocates one the size of the view's base; the fake step, on a fake `TensorImage`, makes the same allocations, op by op"""
    from cnn_cost.memory import step_memory
    def by_op(mc): return {o: sum(b.nbytes for b in mc.blocks if b.op==o) for o in {b.op for b in mc.blocks}}
    m,xb,yb,lf,opt = ALL['fastai_vision_tiny'](); fake = step_memory(m, xb, yb, lf, opt).counter
    m,xb,yb,lf,opt = ALL['fastai_vision_tiny'](); real = step_memory(m, xb, yb, lf, opt, fake=False).counter
    bn = 2*8*10*10*4 + 2*8*8*8*4  # the two batch norms' outputs, which the ReLUs change in place
    assert [by_op(real).get(f'aten.{o}.default') for o in ('new_zeros', 'new_empty_strided')] == [bn, bn]  # the reference does the work to predict
    assert by_op(fake) == by_op(real) and fake.flags == {}

@pytest.mark.parametrize('cast', heavy([True, False], (True, False)))  # fastai's U-Net at 64 px; typed batches stay in the default set through test_fastai_views_changed_in_place
def test_typed_segmentation_learner(cast):
    """fastai's U-Net on `TensorImage`/`TensorMask` batches at 64 px, bs=4, where the peak is in the backward: predicted to the byte against
    `MemTracker` over a real fastai batch, with fastai's default `CastToTensor` (the model gets plain aliases: no `CopySlices` at the in-place ReLUs;
    predicted as typed, it was 2 x 4 x 99 x 64 x 64 x 4 B high) and without it (the model gets fastai's types)"""
    from memory_refs import typed_unet, cpu_peak
    from fastai.learner import CastToTensor
    learn = typed_unet(bs=4)
    if not cast: learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, CastToTensor)))
    assert any(isinstance(c, CastToTensor) for c in learn.cbs) == cast
    ms = learn.memory_summary()
    assert ms.peak_stage == 'backward' and ms.peak == cpu_peak(learn)

@pytest.mark.parametrize('v2', [False, True])
def test_swin_tiny(v2):
    """torchvision's Swin (V1, V2) in small (16 px, 2 x 2 windows, 2 stages): equal to the byte op by op. Its last layer norm gets a permuted gradient
    (`native_layer_norm_backward`'s meta kernel copies its strides, the real kernels return a contiguous one: a `clone` in the fake step only); its
    shifted windows assign Python numbers into a mask (`lift_fresh` constants); V2's position-bias MLP runs an in-place ReLU on a `Linear`'s `view`"""
    from torchvision.models.swin_transformer import SwinTransformer, SwinTransformerBlockV2, PatchMergingV2
    from cnn_cost.memory import step_memory, MemKind
    from fastai.optimizer import Adam
    def by_op(mc): return {o: sum(b.nbytes for b in mc.blocks if b.op==o) for o in {b.op for b in mc.blocks}}
    def kinds(mc): return {k.value: sum(b.nbytes for b in mc.blocks if b.kind==k) for k in MemKind}
    def make():
        torch.manual_seed(0)
        kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
        return SwinTransformer([4, 4], 16, [2, 2], [2, 2], [2, 2], num_classes=10, **kw), torch.randn(2, 3, 16, 16), torch.tensor([1, 7]), torch.nn.CrossEntropyLoss()
    fk = step_memory(*make(), Adam).counter; real = step_memory(*make(), Adam, fake=False).counter
    assert 'aten.lift_fresh.default' not in by_op(fk) and by_op(real)['aten.clone.default'] > 0   # the reference does the work to predict
    if v2 and tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) < (2, 15): assert by_op(real)['aten.new_zeros.default'] >= 4*(3*3*512)*4   # 4 blocks' real `AsStridedBackward0`: a gradient the size of the MLP's 9 x 512 `addmm` (torch 2.15 rebuilds that view without one)
    assert by_op(fk) == by_op(real) and kinds(fk) == kinds(real) and fk.flags == {}
