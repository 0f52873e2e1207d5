"""The memory model without a GPU (CPU, any machine): `python bench/memory_gpu.py --cpu-timing` times predicting resnet50 at 512 x 3 x 224 x 224 for
a CUDA target and checks predictions against real CPU training batches; writes bench/out/memory_cpu.json and .md. On a GPU the memory model is
checked by part 3 of bench/gpu_check.py (predicted peak vs `torch.cuda.max_memory_allocated`, largest batch vs trial, a checkpointing plan)."""
import sys, json, time, platform, argparse, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent/'tests'))
warnings.filterwarnings('ignore')
import torch
from cnn_cost.memory import *
from cnn_cost.learner import *
from memory_refs import tv_learner, unet, rand_dls, cpu_peak, real_saved

def md(rows, cols):
    fmt = lambda v: f'{v:+.2%}' if isinstance(v, float) and abs(v)<1 else (f'{v:.1f}' if isinstance(v, float) else (f'{v:,}' if isinstance(v, int) else str(v)))
    return '\n'.join(['| ' + ' | '.join(cols) + ' |', '|' + '---|'*len(cols)] + ['| ' + ' | '.join(fmt(r[c]) for c in cols) + ' |' for r in rows])

def cpu_timing(rounds=3):
    "Seconds to predict one resnet50 training step at 512 x 3 x 224 x 224 (fp32, CUDA target), on this machine's CPU"
    learn = tv_learner('resnet50', 2, 32)
    xb,yb = torch.empty(1, 3, 224, 224),torch.zeros(1).long()
    ts,ms = [],None
    for _ in range(rounds):
        t = time.perf_counter(); ms = learn.memory_summary(bs=512, xb=xb, yb=yb, device='cuda'); ts.append(time.perf_counter()-t)
    return dict(torch=torch.__version__, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                seconds=sorted(ts)[len(ts)//2], rounds=rounds, peak_gib=ms.peak/2**30)

def cpu_checks():
    "Predicted vs measured on real CPU training batches: saved-for-backward bytes (saved-tensor hooks) and peak live bytes (PyTorch's `MemTracker`)"
    from fastai.vision.all import vision_learner, resnet18, CrossEntropyLossFlat
    cases = {'seed (resnet18 vision_learner, 64x3x28x28)': lambda: vision_learner(rand_dls(64, (3,28,28)), resnet18, pretrained=False, n_out=10,
                                                                               loss_func=CrossEntropyLossFlat()),
             'resnet50 (2x3x224x224)': lambda: tv_learner('resnet50', 2, 224), 'mobilenet_v2 (2x3x224x224)': lambda: tv_learner('mobilenet_v2', 2, 224),
             'vit_b_16 (2x3x224x224)': lambda: tv_learner('vit_b_16', 2, 224), 'unet_learner resnet18 (2x3x64x64)': unet}
    rows = []
    for name,make in cases.items():
        learn = make(); ms = learn.memory_summary()
        sv,pk = real_saved(learn),cpu_peak(learn)
        rows.append(dict(model=name, predicted_saved=ms.saved_total, measured_saved=sv, predicted_peak=ms.peak, memtracker_peak=pk, error=ms.peak/pk-1))
        print(rows[-1], flush=True)
    return rows

def cpu_md(r, chk, out):
    "bench/out/memory_cpu.md from the timing `r` and the checks `chk`"
    (out/'memory_cpu.md').write_text(
        f"Predicting one training step of torchvision resnet50 at 512 x 3 x 224 x 224 (fp32, Adam, CUDA target; predicted peak {r['peak_gib']:.1f} GiB, "
        f"nothing allocated): **{r['seconds']:.2f} s** (median of {r['rounds']}) on {r['cpu']}, {r['threads']} CPU threads, torch {r['torch']}.\n\n"
        "Predicted (fake tensors, fp32, Adam) vs real CPU training batches of the same learners: bytes saved for backward (saved-tensor hooks, each "
        "storage once, parameters and batch left out) and peak live tensor bytes (PyTorch's `MemTracker` over a real steady-state fastai batch):\n\n"
        + md(chk, ['model','predicted_saved','measured_saved','predicted_peak','memtracker_peak','error']) + '\n')

if __name__=='__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--cpu-timing', action='store_true')
    a = ap.parse_args()
    out = Path(__file__).parent/'out'; out.mkdir(exist_ok=True)
    if a.cpu_timing:
        r = cpu_timing(); print(r); chk = cpu_checks(); (out/'memory_cpu.json').write_text(json.dumps(dict(timing=r, checks=chk), indent=1))
        cpu_md(r, chk, out)
        sys.exit()
    sys.exit('Run with --cpu-timing; on a GPU, bench/gpu_check.py part 3 checks the memory model')
