import os, signal, subprocess, sys, warnings, pytest

def _amx_broken():
    "Whether oneDNN's AMX bfloat16 kernels die with SIGILL here: some sandboxes advertise AMX but do not grant its tile state"
    r = subprocess.run([sys.executable, '-c', 'import torch; torch.ones(8,1024,dtype=torch.bfloat16)@torch.ones(1024,512,dtype=torch.bfloat16)'],
                       capture_output=True)
    return r.returncode == -signal.SIGILL
# set before torch loads oneDNN; subprocesses (the CLI tests) inherit it
if 'ONEDNN_MAX_CPU_ISA' not in os.environ and _amx_broken(): os.environ['ONEDNN_MAX_CPU_ISA'] = 'AVX512_CORE_BF16'
import torch
warnings.filterwarnings('ignore', category=FutureWarning)

def pytest_configure(config):
    if os.environ.get('CNN_COST_SLOW')=='1' and config.getoption('markexpr')=='not slow': config.option.markexpr = ''  # the addopts' default: run all

def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    # `slow` tests are deselected by pyproject's addopts (`-m 'not slow'`), as nbdev's tst_flags skips `#| slow` cells; run them with
    # `make test-slow` (`pytest -m slow`) or all with `make test-all` (`-m "slow or not slow"`). With the addopts replaced by a `-m` that
    # does not name `slow`, they are skipped unless CNN_COST_SLOW=1.
    run_slow = 'slow' in (config.getoption('markexpr') or '') or os.environ.get('CNN_COST_SLOW')=='1'
    skip_slow = pytest.mark.skip(reason="slow: run with `pytest -m slow` or CNN_COST_SLOW=1")
    for it in items:
        if 'cuda' in it.keywords and not torch.cuda.is_available(): it.add_marker(skip_cuda)
        if 'slow' in it.keywords and not run_slow: it.add_marker(skip_slow)

def heavy(names, slow):
    "`names` as parameters, those in `slow` marked slow: real steps of full-size models, which the default run leaves to `make test-slow`"
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]

def hook_count(model):
    "Number of forward/backward hooks left on any module of `model`"
    return sum(len(m._forward_hooks)+len(m._forward_pre_hooks)+len(m._backward_hooks)+len(getattr(m, '_backward_pre_hooks', {}))
               for m in model.modules())

def new_seed_learner(seed=0):
    "The seed setup: fastai resnet18 `vision_learner` on the digits, batch 64 x 3 x 28 x 28, 10 classes; weights from `torch.manual_seed(seed)` (None: not seeded)"
    from fastai.vision.all import vision_learner, resnet18
    from cnn_cost.data import digits_dls
    if seed is not None: torch.manual_seed(seed)
    return vision_learner(digits_dls(), resnet18, pretrained=False, n_out=10)

@pytest.fixture(scope='session')
def seed_learner(): return new_seed_learner()

@pytest.fixture(scope='session')
def seed_summary(seed_learner):
    return seed_learner.cost_summary(n_repeat=7)
