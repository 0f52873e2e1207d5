"""An independent reference for per-layer times: `torch.profiler`'s op and kernel times, charged to modules without cnn_cost's hooks or clocks.

Forward: every module call is a `record_function` range `cc::<qualified name>`; an op's time goes to the innermost range around it (the module
that was running, as cnn_cost charges it). Backward: autograd runs each node inside an `autograd::engine::evaluate_function: <Node>` event that
carries the node's sequence number, and the forward op that made the node carries the same number (`FunctionEvent.sequence_nr`, on the thread
`fwd_thread`): a node's time goes to the module whose range held that forward op. A recompute (activation checkpointing) inside a node is that
node's. `AccumulateGrad` nodes (parameters, no forward op) go to the module of the node before them on the same thread: autograd runs them
right after the node that made the gradient. Nodes of no module (the loss's) are `loss`; ops outside every range and node are `outside`.
Time of an op: its own CPU time (`self_cpu_time_total`; ranges' and nodes' own bookkeeping left out) or, `device='cuda'`, the time of the kernels
it launched (`self_device_time_total`, matched by CUPTI correlation ids). Units: µs."""
from collections import defaultdict
import numpy as np, torch
from torch.profiler import profile, ProfilerActivity, record_function
from fastai.callback.core import Callback

_node = 'autograd::engine::evaluate_function: '

class _OpenRanges:
    "A handle whose `remove` drops the ranges left open on `mods`: torch stops a non-reentrant recompute inside a module, before its post-hook runs"
    def __init__(self, mods): self.mods = mods
    def remove(self):
        for m in self.mods: m.__dict__.pop('_cc_rf', None)

def range_hooks(model, leaves_only=False, prefix='cc::'):
    "Wrap every module call of `model` (or only its leaves) in a `record_function` range `<prefix><qualified name>`; returns the hook handles"
    hs,mods = [],[]
    for n,m in model.named_modules():
        if leaves_only and (not n or list(m.children())): continue
        def pre(m, a, n=n): m.__dict__.setdefault('_cc_rf', []).append(record_function(prefix+n)); m._cc_rf[-1].__enter__()
        def post(m, a, o): m._cc_rf.pop().__exit__(None, None, None)
        hs += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]; mods.append(m)
    return hs + [_OpenRanges(mods)]

def _own_us(e, device):
    "An op's own time: its kernels' on a GPU (each kernel once, through the op that launched it), else its CPU time; 0 for ranges and device events"
    if e.name.startswith('cc::') or e.is_user_annotation or e.device_type!=torch.autograd.DeviceType.CPU: return 0.  # a range's own time is bookkeeping
    return e.self_device_time_total if device=='cuda' else e.self_cpu_time_total

def attribute(events, device='cpu'):
    """{'fwd': {module: µs}, 'bwd': {module: µs}, 'loss': µs, 'outside': µs, 'recompute': {module: µs}} from a profile's `events()`:
    each op's own time (`_own_us`) charged as the module docstring says. Module names are qualified names ('' the root)"""
    fwd,bwd,rec = defaultdict(float),defaultdict(float),defaultdict(float)
    res = dict(fwd=fwd, bwd=bwd, recompute=rec, loss=0., outside=0.)
    evs = sorted(events, key=lambda e: e.time_range.start)
    anc = {}
    def chain(e):
        "(innermost range below the innermost node, innermost node, outermost node) at or above `e`"
        k = id(e)
        if k not in anc:
            p = e.cpu_parent
            rng,inner,outer = chain(p) if p is not None else (None, None, None)
            if e.name.startswith(_node): rng,inner,outer = None,e,outer or e
            elif e.name.startswith('cc::'): rng = e
            anc[k] = (rng, inner, outer)
        return anc[k]
    # the module of each autograd sequence number: that of the LAST op that carried it, the one that made the node (ops that make no node, such as
    # `argmax` or `detach`, carry the number the next node will take); ops of a recompute count too: a reentrant checkpoint's nested backward runs their nodes
    seq2mod = {}
    for e in evs:
        rng = chain(e)[0]
        if rng is not None and e.sequence_nr>=0: seq2mod[(e.thread, e.sequence_nr)] = rng.name[4:]
    node_mod,last = {},{}
    for e in evs:  # each node's module, in the order autograd ran them on each thread
        if not e.name.startswith(_node): continue
        acc = 'AccumulateGrad' in e.name
        m = last.get(e.thread) if acc else seq2mod.get((e.fwd_thread, e.sequence_nr)) if e.sequence_nr>=0 else None
        node_mod[id(e)] = m
        if not acc: last[e.thread] = m  # a loss node: the parameters' gradients after it are not a module's
    bm = {}
    def bmod(e):
        "The module of the innermost node at or above `e` that has one"
        k = id(e)
        if k not in bm:
            m = node_mod.get(k)  # '' (the root) is a module too
            bm[k] = m if m is not None else bmod(e.cpu_parent) if e.cpu_parent is not None else None
        return bm[k]
    for e in evs:
        us = _own_us(e, device)
        if not us: continue
        rng,inner,outer = chain(e)
        if outer is None:
            if rng is not None: fwd[rng.name[4:]] += us
            else: res['outside'] += us
        elif rng is not None: bwd[rng.name[4:]] += us; rec[rng.name[4:]] += us  # forward ops run again inside the backward: the recomputed module's
        elif (m:=bmod(e)) is not None: bwd[m] += us
        else: res['loss'] += us
    return res

def _device_work(prof):
    "The device activities of `prof` (kernels, copies, sets): not the ranges the profiler projects onto the GPU's timeline (`gpu_user_annotation`)"
    return [e for e in prof.profiler.kineto_results.events() if e.device_type()==torch.autograd.DeviceType.CUDA and e.duration_ns()>0
            and not e.is_user_annotation() and 'annotation' not in getattr(e, 'activity_type', lambda: '')()]

def kernel_us(prof):
    "Total time (µs) of the device activities in `prof`, overlaps counted as often as they run: what `attribute` shares out, on a GPU"
    return sum(e.duration_ns() for e in _device_work(prof))/1e3

def kernel_busy_us(prof):
    "GPU busy time (µs) in `prof`: the union of the intervals of its device activities, overlaps counted once; 0 on a CPU"
    iv = sorted((e.start_ns(), e.start_ns()+e.duration_ns()) for e in _device_work(prof))
    tot,end = 0,None
    for a,b in iv:
        if end is None or a>end: tot += b-a; end = b
        elif b>end: tot += b-end; end = b
    return tot/1e3

class RefProfiler(Callback):
    """Profile training batches `every`-th from `start` with `torch.profiler` and `range_hooks` on every module (each batch in a profile of its
    own), and keep `attribute`'s per-module split of each: `results`, a list of dicts with also 'busy_us' (`kernel_busy_us`), 'wall_us' (host time
    of the batch, synchronized) and 'iter'. Attach it beside a `CostProfiler(skip=start-1, every=every)` to profile the batches between its own."""
    order,run_valid = 4,False
    def __init__(self, start=3, every=2, n_batches=4, trace_dir=None, modules=True):
        "`modules=False`: on a GPU, device activities only and no ranges (the least the profiler adds to the host), for `busy_us` and `wall_us` alone"
        self.start,self.every,self.n,self.trace_dir,self.modules,self.results = start,every,n_batches,trace_dir,modules,[]
    def before_fit(self): self.results,self._p = [],None
    def before_batch(self):
        i = self.train_iter
        if not (self.training and i>=self.start and (i-self.start)%self.every==0 and len(self.results)<self.n): return
        self.cuda,self._iter = next(self.learn.model.parameters()).is_cuda,i
        if self.cuda: torch.cuda.synchronize()
        only = self.cuda and not self.modules
        self._hs = [] if only else range_hooks(self.learn.model)
        self._p = profile(activities=[ProfilerActivity.CUDA] if only else [ProfilerActivity.CPU]+[ProfilerActivity.CUDA]*self.cuda); self._p.__enter__()
        import time; self._t0 = time.perf_counter_ns()
    def after_batch(self):
        if self._p is None: return
        import time
        if self.cuda: torch.cuda.synchronize()
        wall = (time.perf_counter_ns()-self._t0)/1e3
        self._p.__exit__(None, None, None)
        for h in self._hs: h.remove()
        p,self._p = self._p,None
        r = attribute(p.events(), 'cuda' if self.cuda else 'cpu') if self._hs else {}
        r.update(iter=self._iter, wall_us=wall, busy_us=kernel_busy_us(p) if self.cuda else np.nan, kernel_us=kernel_us(p) if self.cuda else np.nan)
        if self.trace_dir is not None and self._hs and not self.results: p.export_chrome_trace(str(self.trace_dir/f'trace_{self.learn.model.__class__.__name__}_{self._iter}.json'))
        self.results.append(r)
    def after_fit(self):
        if self._p is not None: self._p.__exit__(None, None, None); self._p = None

def median_split(results, key):
    "{module: median µs over `results`} of `key` ('fwd', 'bwd' or 'recompute'); a module missing from a batch counts 0 there"
    names = {n for r in results for n in r[key]}
    return {n: float(np.median([r[key].get(n, 0.) for r in results])) for n in names}
