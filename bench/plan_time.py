"""Wall time of `learn.memory_plan(...)` for torchvision resnet50 at batch 512 x 3 x 224 x 224 (fp32, Adam), for a CUDA target, on this CPU:
nothing allocated, every peak predicted on fake tensors. The plan runs the step once per (batch size, dtype, checkpointed blocks) it considers;
the plot's curves (three batch sizes per option) are timed apart. Run: python bench/plan_time.py [--rounds 3] [--budgets 24,32]"""
import argparse, json, time, warnings, numpy as np, torch, torchvision
from pathlib import Path
from fastai.vision.all import Learner, CrossEntropyLossFlat, set_seed
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from cnn_cost.plan import *

def learner(size=224):
    "resnet50 (random weights, 10 classes) on one batch of 2 random `size`² images: the plan takes only the batch's shapes"
    set_seed(0)
    ds = list(zip(torch.randn(2, 3, size, size), torch.randint(0, 10, (2,))))
    return Learner(DataLoaders(DataLoader(ds, bs=2), DataLoader(ds, bs=2)), torchvision.models.resnet50(num_classes=10), loss_func=CrossEntropyLossFlat())

def main(rounds=3, budgets='24,32', bs=512):
    learn = learner()
    res = {}
    for b in map(float, budgets.split(',')):
        ts,tp = [],[]
        for _ in range(rounds):
            t = time.perf_counter(); plan = learn.memory_plan(b, bs=bs, device='cuda', show_plot=False); ts.append(time.perf_counter()-t)
            n = len(plan.steps.peaks)
            t = time.perf_counter(); plan.plot(); tp.append(time.perf_counter()-t)
        s = plan.suggestion
        res[b] = dict(plan_s=float(np.median(ts)), plan_s_min=float(min(ts)), plan_s_max=float(max(ts)), plot_s=float(np.median(tp)),
                      steps=n, plot_steps=len(plan.steps.peaks)-n, as_is_gib=plan.peak/2**30, options=[(o.name, o.micro, o.n_acc, o.dtype, len(o.blocks), o.peak/2**30, o.fits, o.extra)
                      for o in plan.options], suggestion=s.name if s else None, text=str(plan))
        print(plan)
    out = dict(setup=f'resnet50 {bs}x3x224x224 fp32 Adam, CUDA target', rounds=rounds, threads=torch.get_num_threads(), torch=torch.__version__, budgets=res)
    print(json.dumps({k: v for k,v in out.items() if k!='budgets'} | {str(b): {k: v for k,v in r.items() if k not in ('text','options')} for b,r in res.items()}, indent=1))
    o = Path(__file__).parent/'out'; o.mkdir(exist_ok=True)
    (o/'plan_time.json').write_text(json.dumps(out, indent=1))
    md = [f"Planning torchvision resnet50 at batch 512 x 3 x 224 x 224 (fp32, Adam) for a CUDA target, on {torch.get_num_threads()} CPU threads, torch {torch.__version__}, "
          f"median of {rounds} (nothing allocated; the step as it is needs {res[b]['as_is_gib']:.3g} GiB):", "",
          "| budget | `memory_plan` s (min–max) | fake steps it ran | suggestion | `plan.plot()` s (fake steps) |", "|---|---|---|---|---|"]
    md += [f"| {b:g} GiB | {r['plan_s']:.1f} ({r['plan_s_min']:.1f}–{r['plan_s_max']:.1f}) | {r['steps']} | {r['suggestion']} | {r['plot_s']:.1f} ({r['plot_steps']}) |" for b,r in res.items()]
    md += ["", f"The plan for {list(res)[0]:g} GiB:", "", "```", res[list(res)[0]]['text'].strip(), "```"]
    (o/'plan_time.md').write_text('\n'.join(md)+'\n')
    return out

if __name__ == '__main__':
    p = argparse.ArgumentParser(); p.add_argument('--rounds', type=int, default=3); p.add_argument('--budgets', default='24,32'); a = p.parse_args()
    with warnings.catch_warnings(): warnings.simplefilter('ignore'); main(a.rounds, a.budgets)
