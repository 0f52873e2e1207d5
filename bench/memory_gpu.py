"""The memory model on a real GPU: (1) predicted peak vs `torch.cuda.max_memory_allocated` of real training steps, fp32 and fp16;
(2) predicted largest batch vs the boundary found by trial (double until out of memory, then bisect). Writes bench/out/memory_gpu.json and .md
(both tables, for BENCHMARKS.md via bench/report.py). Needs a CUDA GPU; run on an otherwise idle one:
    python bench/memory_gpu.py            # both tables
    python bench/memory_gpu.py --quick    # resnet18 only
Also (CPU, any machine): `python bench/memory_gpu.py --cpu-timing` times predicting resnet50 at 512 x 3 x 224 x 224."""
import sys, json, time, platform, argparse, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent/'tests'))
warnings.filterwarnings('ignore')
import torch
from cnn_cost.memory import *
from cnn_cost.learner import *
from memory_refs import tv_learner, unet, rand_dls, cuda_peak, cpu_peak, real_saved, trial_max_batch

def learner(name, bs, dtype, n_batches=2):
    "A learner of model `name` on random data on the GPU, trained as `dtype` ('fp32' or 'fp16')"
    learn = unet(bs, 224, device='cuda', n_batches=n_batches) if name=='unet' else tv_learner(name, bs, 224, device='cuda', n_batches=n_batches)
    learn.model.cuda()
    return learn.to_fp16() if dtype=='fp16' else learn

def peak_table(models, bs):
    rows = []
    for name in models:
        for dt in ('fp32', 'fp16'):
            learn = learner(name, bs, dt)
            t = time.perf_counter(); ms = learn.memory_summary(device='cuda'); t = time.perf_counter()-t
            ref = cuda_peak(learn)
            rows.append(dict(model=name, bs=bs, dtype=dt, predicted=ms.peak, max_memory_allocated=ref, reserved=torch.cuda.max_memory_reserved(),
                             error=ms.peak/ref-1, predict_s=t))
            print(rows[-1], flush=True)
            del learn; torch.cuda.empty_cache()
    return rows

def batch_table(models):
    rows = []
    for name in models:
        for dt in ('fp32', 'fp16'):
            free = torch.cuda.mem_get_info()[0]
            learn = learner(name, 8, dt)
            t = time.perf_counter(); mb = learn.max_batch(budget=free/2**30, show_plot=False); t = time.perf_counter()-t
            del learn; torch.cuda.empty_cache()
            real = trial_max_batch(lambda b: learner(name, b, dt))
            rows.append(dict(model=name, dtype=dt, budget=free, predicted_bs=mb.bs, trial_bs=real, error=mb.bs/real-1, predict_s=t))
            print(rows[-1], flush=True)
    return rows

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
    ap.add_argument('--quick', action='store_true'); ap.add_argument('--cpu-timing', action='store_true'); ap.add_argument('--bs', type=int, default=64)
    a = ap.parse_args()
    out = Path(__file__).parent/'out'; out.mkdir(exist_ok=True)
    if a.cpu_timing:
        r = cpu_timing(); print(r); chk = cpu_checks(); (out/'memory_cpu.json').write_text(json.dumps(dict(timing=r, checks=chk), indent=1))
        cpu_md(r, chk, out)
        sys.exit()
    if not torch.cuda.is_available(): sys.exit("memory_gpu.py needs a CUDA GPU (use --cpu-timing for the CPU figure)")
    models = ['resnet18'] if a.quick else ['resnet18', 'resnet50', 'mobilenet_v2', 'vit_b_16', 'unet']
    dev = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda)
    peaks = peak_table(models, a.bs)
    batches = batch_table(models)
    (out/'memory_gpu.json').write_text(json.dumps(dict(device=dev, peaks=peaks, batches=batches), indent=1))
    res = (f"{dev['gpu']}, torch {dev['torch']}, CUDA {dev['cuda']}.\n\nPredicted peak vs `torch.cuda.max_memory_allocated` of real training epochs "
           f"(batch {a.bs}, 224², steady state; bytes):\n\n" + md(peaks, ['model','dtype','predicted','max_memory_allocated','reserved','error','predict_s']) +
           "\n\nPredicted largest batch (budget: the free GPU memory) vs the boundary found by trial (double until out of memory, then bisect):\n\n" +
           md(batches, ['model','dtype','budget','predicted_bs','trial_bs','error','predict_s']) + '\n')
    (out/'memory_gpu.md').write_text(res); print(res)
