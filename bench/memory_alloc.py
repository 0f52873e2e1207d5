"""What the tensor-level references cannot see: the CPU allocator's peak over a real training step (`alloc_peak`: `torch.profiler` memory events)
against the prediction (CPU target) and `MemTracker`, for cases where kernels allocate scratch inside themselves (oneDNN convolutions and LSTMs) and
cases where they do not. Writes bench/out/memory_alloc.json and .md (for BENCHMARKS.md).
    python bench/memory_alloc.py"""
import sys, json, warnings, platform
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent/'tests')); sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings('ignore')
import torch, torch.nn as nn, torchvision
from fastai.optimizer import Adam
from fastai.torch_core import set_seed
from memory_refs import alloc_peak, step_peak
from memory_corpus import cases
from cnn_cost.memory import predict_memory

def _frozen():
    "torchvision resnet18 with all but its last stage and head frozen, as fastai's `freeze` leaves a pretrained body"
    m,x,y,lf = cases()['tv_resnet18']()
    for n,p in m.named_parameters(): p.requires_grad_(n.startswith(('layer4', 'fc')))
    return m,x,y,lf

CASES = {k: cases()[k] for k in ['lstm', 'lstm_issue17', 'gru', 'mha', 'fastai_vision_tiny', 'tv_resnet18', 'tv_mobilenet_v3_small', 'timm_convnext_atto', 'timm_vit_tiny_patch16_224']}
CASES['tv_resnet18_frozen_body'] = _frozen

def run(name, make):
    def get():
        set_seed(0); m,xb,yb,lf = make()[:4]
        return m,(xb if isinstance(xb, tuple) else (xb,)),(yb if isinstance(yb, tuple) else (yb,)),lf
    m,xb,yb,lf = get(); pred = predict_memory(m, xb, yb, lf, Adam).peak
    m,xb,yb,lf = get()
    try: mt = step_peak(m, xb, yb, lf, Adam)
    except RuntimeError: mt = None  # MemTracker cannot hook frozen parameters
    m,xb,yb,lf = get(); al = alloc_peak(m, xb, yb, lf, Adam)
    return dict(name=name, predicted=pred, memtracker=mt, allocator=al)

if __name__=='__main__':
    out = Path(__file__).parent/'out'; out.mkdir(exist_ok=True)
    rows = []
    for k,v in CASES.items(): rows.append(run(k, v)); print(rows[-1], flush=True)
    (out/'memory_alloc.json').write_text(json.dumps(rows, indent=1))
    md = [f"torch {torch.__version__}, {platform.processor() or platform.machine()}, CPU target, fastai Adam, small inputs (the corpus's)", '',
          '| model | predicted peak | MemTracker peak | allocator peak (`torch.profiler`) | allocator above prediction |', '|---|---|---|---|---|']
    md += [f"| {r['name']} | {r['predicted']:,} | {'' if r['memtracker'] is None else format(r['memtracker'], ',')} | {r['allocator']:,} | "
           f"{r['allocator']/r['predicted']-1:+.1%} |" for r in rows]
    (out/'memory_alloc.md').write_text('\n'.join(md) + '\n'); print('\n'.join(md))
