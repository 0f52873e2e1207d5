"""Overhead of `CostProfiler` on the seed's setup (fastai resnet18, digits 64 x 3 x 28 x 28, CPU), inside real `fit` batches.

A. Profiled vs unprofiled batches, interleaved in one fit (`every=2`): each profiled batch's time over the mean of its two unprofiled
   neighbours; median and min-max of those ratios. The first profiled batch (it also runs the one-off MAC-counting forward) is left out.
B. Unprofiled batches with the callback attached (`n_batches=0`) vs without it: `--rounds` pairs of short fits in alternating order,
   ratio of their median batch times per round; median and min-max over rounds.
C. What a frozen body saves: `freeze()` and `unfreeze()` in alternating order for `--rounds` pairs of short profiled fits; per profiled batch
   the body convs' backward time over their forward time, median per fit, and the ratio frozen / trainable per round. The MACs predict it:
   a frozen conv computes the input gradient only (backward MACs = forward MACs; the first conv, whose input needs no gradient, none).
Data loading runs in the main process (`num_workers=0`), outside the timed span. Batch time: from the first `before_batch` to the last `after_batch` callback, so hook setup, removal and collection all count.
Run: python bench/callback_overhead.py [--batches 66] [--rounds 12] [--per_fit 4]"""
import argparse, json, random, time, numpy as np, torch
from pathlib import Path
from fastai.vision.all import *
from cnn_cost.all import *
from cnn_cost.callback import CostProfiler

class BatchStart(Callback):
    order,run_valid = -99,False  # first `before_batch` of training batches
    def __init__(self, ts): self.ts = ts
    def before_batch(self): self.ts.t0 = time.perf_counter()
class BatchEnd(Callback):
    order,run_valid = 99,False   # last `after_batch`; stops the fit after `n` training batches
    def __init__(self, ts, n): self.ts,self.n = ts,n
    def after_batch(self):
        self.ts.append(time.perf_counter()-self.ts.t0)
        if len(self.ts)>=self.n: raise CancelFitException()

class _Times(list): t0 = 0.
def batch_times(learn, n, cbs=(), epochs=1):
    "Seconds of each of the first `n` training batches of a fit of `epochs` with `cbs`"
    ts = _Times()
    with learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-3, cbs=[BatchStart(ts), BatchEnd(ts, n), *cbs])
    return np.array(ts)

def body_conv_bwd_over_fwd(learn, frozen, n=4):
    "Median over `n` profiled batches of the body convs' backward/forward time, and their backward/forward MACs"
    learn.freeze() if frozen else learn.unfreeze()
    cp = CostProfiler(skip=1, n_batches=n)
    batch_times(learn, n+1, [cp])
    df = cp.summary().df; conv = df[(df.type=='Conv2d') & df.name.str.startswith('0.')]
    t = np.median([sum(b['bwd'][j] for j in conv.index)/sum(b['fwd'][j] for j in conv.index) for b in cp.batches])
    return t, conv.bwd_macs.sum()/conv.macs.sum()

def main(batches=66, rounds=12, per_fit=4):
    dls = digits_dls(num_workers=0)  # no loader processes competing for the cores while batches are timed
    learn = vision_learner(dls, resnet18, pretrained=False, n_out=10)
    res = {'setup': f'fastai resnet18, digits 64x3x28x28, cpu, torch threads={torch.get_num_threads()}'}
    cp = CostProfiler(skip=2, every=2, n_batches=None)
    t = batch_times(learn, batches, [cp], epochs=-(-batches//len(dls.train)))
    prof = [b['iter'] for b in cp.batches][1:]
    r = np.array([t[i]/np.mean([t[i-1], t[i+1]]) for i in prof if i+1 < len(t)])
    s = cp.summary()
    cover_f = [sum(b['fwd'])/b['step']['forward'] for b in cp.batches]; cover_b = [sum(b['bwd'])/b['step']['backward'] for b in cp.batches]
    book_f = [b.get('book', np.nan)/b['step']['forward'] for b in cp.batches]  # cnn_cost's own bookkeeping, in no row
    res['A_profiled_vs_unprofiled'] = dict(ratio_median=float(np.median(r)), ratio_min=float(r.min()), ratio_max=float(r.max()), n_pairs=len(r),
        unprofiled_batch_ms_median=float(np.median(np.delete(t, [b['iter'] for b in cp.batches])*1e3)),
        forward_coverage_pct=float(100*np.median(cover_f)), backward_coverage_pct=float(100*np.median(cover_b)), forward_bookkeeping_pct=float(100*np.median(book_f)))
    ws,wo = [],[]
    for i in range(rounds):
        for with_cb in ([True, False] if i%2==0 else [False, True]):
            t = batch_times(learn, per_fit, [CostProfiler(n_batches=0)] if with_cb else [])[1:]
            (ws if with_cb else wo).append(np.median(t))
    r = np.array(ws)/np.array(wo)
    res['B_attached_unprofiled_vs_without'] = dict(ratio_median=float(np.median(r)), ratio_min=float(r.min()), ratio_max=float(r.max()),
        rounds=rounds, batches_per_fit=per_fit-1)
    fr,tr,m = [],[],{}
    for i in range(rounds):
        for frozen in ([True, False] if i%2==0 else [False, True]):
            t,m[frozen] = body_conv_bwd_over_fwd(learn, frozen)
            (fr if frozen else tr).append(t)
    learn.unfreeze()
    r = np.array(fr)/np.array(tr)
    res['C_frozen_body'] = dict(ratio_median=float(np.median(r)), ratio_min=float(r.min()), ratio_max=float(r.max()), rounds=rounds,
        frozen_bwd_over_fwd_time=float(np.median(fr)), trainable_bwd_over_fwd_time=float(np.median(tr)),
        frozen_bwd_over_fwd_macs=float(m[True]), trainable_bwd_over_fwd_macs=float(m[False]))
    print(json.dumps(res, indent=1))
    o = Path(__file__).parent/'out'; o.mkdir(exist_ok=True)
    (o/'callback_overhead.json').write_text(json.dumps(res, indent=1))
    a,b,c = res['A_profiled_vs_unprofiled'],res['B_attached_unprofiled_vs_without'],res['C_frozen_body']
    (o/'callback_overhead.md').write_text(
        f"{res['setup']}; unprofiled training batch {a['unprofiled_batch_ms_median']:.0f} ms (median)\n\n"
        "| comparison | median (min–max) | n |\n|---|---:|---:|\n"
        f"| profiled batch / neighbouring unprofiled batches | {a['ratio_median']:.3f} ({a['ratio_min']:.3f}–{a['ratio_max']:.3f}) | {a['n_pairs']} pairs |\n"
        f"| callback attached, not profiling / no callback | {b['ratio_median']:.3f} ({b['ratio_min']:.3f}–{b['ratio_max']:.3f}) | {b['rounds']} rounds of {b['batches_per_fit']} batches |\n\n"
        f"Per-layer rows cover {a['forward_coverage_pct']:.1f}% of the measured forward pass and {a['backward_coverage_pct']:.1f}% of the backward pass (median over profiled batches); "
        f"cnn_cost's own bookkeeping, kept out of the rows (arming the gradient hooks, the saved-tensor hooks), is {a.get('forward_bookkeeping_pct', float('nan')):.1f}% of the forward.\n\n"
        "What `freeze()` saves, as the profiler measures it (body convs, backward over forward):\n\n"
        "| body | backward / forward MACs | backward / forward time, median of fits |\n|---|---:|---:|\n"
        f"| frozen | {c['frozen_bwd_over_fwd_macs']:.2f} | {c['frozen_bwd_over_fwd_time']:.2f} |\n"
        f"| trainable | {c['trainable_bwd_over_fwd_macs']:.2f} | {c['trainable_bwd_over_fwd_time']:.2f} |\n\n"
        f"Frozen / trainable, paired by round: MACs {c['frozen_bwd_over_fwd_macs']/c['trainable_bwd_over_fwd_macs']:.3f}, "
        f"time {c['ratio_median']:.3f} ({c['ratio_min']:.3f}–{c['ratio_max']:.3f}), {c['rounds']} rounds.\n")
    return res

if __name__ == '__main__':
    p = argparse.ArgumentParser()
    p.add_argument('--batches', type=int, default=66); p.add_argument('--rounds', type=int, default=12); p.add_argument('--per_fit', type=int, default=4)
    a = p.parse_args(); main(a.batches, a.rounds, a.per_fit)
