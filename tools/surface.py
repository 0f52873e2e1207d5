#!/usr/bin/env python
"""Narrow `from cnn_cost.all import *` to what a user calls or reads (issue 25, item 2), in fastai's manner.

Run from the repository root, then `nbdev-export && nbdev-clean`. Idempotent: a second run changes nothing.
1. In each notebook of a module that `cnn_cost/all.py` star-imports, an `#| export` cell that defines only names outside `SURFACE`
   becomes `#| exporti` (its names leave the module's `__all__`) plus `#| exec_doc`, so that nbdev still shows its `show_doc`
   entries on the module's page (`--no-docs`: without); a cell that defines both is split into consecutive cells.
2. Every place that then loses a name it took from a star import gets an explicit import of it from the defining module: the
   notebooks' `#| export` import cells (what the module's code uses) and their test import cells, nbs/index and nbs/10_tutorial,
   tests/, bench/ and tools/. Names are found with pyflakes (the names a file takes from star imports) and `ast`.
3. `cnn_cost/all.py` star-imports every module but `cli`, so that the `__all__`s decide.
4. nbs/index.ipynb gets the section "The API on one screen".
Cells are found by the names they define, never by ids or positions; what cannot be placed is reported (exit code 1)."""
import ast, json, re, sys, hashlib, importlib
from pathlib import Path
try: from pyflakes import checker, messages
except ImportError: sys.exit("tools/surface.py needs pyflakes: `pip install pyflakes`")

# What a user calls or reads: `from cnn_cost.all import *` brings these names, and no other of the package's own
SURFACE = ('model_cost CostSummary CostProfiler TrainProfile digits_dls '
           'MemorySummary predict_memory MemKind MaxBatch MemoryPlan PlanOption CheckpointBlocks block_names RankMemory '
           'cost_sweep CostSweep compare Comparison calibrate set_ceilings Ceilings '
           'StepError RestoreError layer_rule op_rule fake_fix fake_check').split()
# The docs' home page: the surface and the `Learner` patches (they come with importing the modules), one line each
API = {
 'Measure': [
  "`learn.cost_summary()` → `CostSummary` of one batch of the learner's data, per layer",
  "`model_cost(model, *xb)` → `CostSummary` of any `nn.Module` on a batch",
  "`CostSummary`: MACs, activation bytes and time per layer: `.df`, `.stages()`, `.top(k)`, `.plot()`, `.efficiency()`, `.to_csv()`",
  "`CostProfiler()`: callback; `learn.fit(1, cbs=CostProfiler())` profiles real training batches, forward and backward",
  "`learn.train_profile` → `TrainProfile` of the last profiled fit: `.summary()`, `.steps()`, `.plot()`",
  "`digits_dls(size=28, bs=64)` → fastai `DataLoaders` of scikit-learn's embedded digits (nothing downloaded)"],
 'Memory, predicted on fake tensors (nothing allocated)': [
  "`learn.memory_summary(bs, device=...)` → `MemorySummary`: one training step per layer and kind, the peak and who holds it",
  "`predict_memory(model, xb, yb, loss_func)` → `MemorySummary` without a `Learner`",
  "`MemKind`: the kinds: parameters, buffers, gradients, optimizer state, inputs, saved activations, outputs, temporaries",
  "`learn.max_batch(budget)` → `MaxBatch`: the largest `bs` whose step fits in `budget` GiB, its `peak`; `.plot()`",
  "`learn.memory_plan(budget, bs)` → `MemoryPlan`: ways to train batch `bs` in `budget`, cheapest first; `.plot()`",
  "`PlanOption`: one way: micro-batch, accumulation steps, dtype, checkpointed `blocks`, its `peak` and `recompute_macs`",
  "`learn.checkpoint(names)` adds `CheckpointBlocks`, the callback training those blocks under activation checkpointing",
  "`block_names(model)` → the model's repeated blocks, the candidates for checkpointing",
  "`learn.rank_memory(bs)` → `RankMemory`: one DDP rank's step, DDP's gradient buckets and the rank's `peak`"],
 'Why': [
  "`cost_sweep(learn, sizes)` → `CostSweep`: one summary per input size; `.exponents()`, `.stage_shares()`, `.plot()`",
  "`compare(a, b)` (or `b - a`) → `Comparison`: per-layer and per-stage deltas and ratios of two summaries",
  "`calibrate(device)` → `Ceilings`: FLOP/s, bytes/s, per-call floor and caches, the roofs of `cs.efficiency()`",
  "`set_ceilings(flops, bw)`: known peaks (e.g. a GPU's data sheet) instead of measured ones"],
 'When a step cannot run': [
  "`StepError`: the predicted step fails as the real one would: `.stage` and the real kernel's `.reason`",
  "`RestoreError`: a call could not put something back on the model: `.failed`, `.cause`; all else was put back"],
 'Extend': [
  "`@layer_rule(MyLayer)`: the MAC rule `f(m, ins, outs) -> (macs, elem_ops)` of a module type",
  "`@op_rule(aten.op)`: the MAC formula of an aten op that `torch.utils.flop_counter` does not count",
  "`@fake_fix(aten.op)`, `@fake_check(aten.op)`: corrections to torch's fake kernels (outputs that differ, inputs the real one refuses)"],
}
# The one-way flow: a module imports only from modules of a lower rank
FLOW = dict(core=0, data=0, counting=1, timing=1, summary=2, fake=2.5, learner=3, memory=3, plots=3, ranks=4, plan=4, callback=4, analysis=4, cli=5)
# A cell made `exporti` also gets `#| exec_doc`: nbdev then still adds its `show_doc` entries, so the module's page, its anchors and the
# links to them stay as they were (`--no-docs`: fastai's plain `exporti`, helpers without entries)
KEEP_DOCS = '--no-docs' not in sys.argv
NOT_IN_ALL = {'cli': "a command (`cnn-cost`), not a library surface; importing it sets a process-wide warnings filter"}
API_TITLE = '## The API on one screen'
PKG = 'cnn_cost'

root = Path('.').resolve()
sys.path[:0] = [str(root/d) for d in ('tests', 'bench', 'tools')]  # their own helper modules, for their star names
problems, notes, changes = [], [], []
def problem(s): problems.append(s)
def note(s): notes.append(s)
def change(s): changes.append(s)

# ---------- notebooks
DIRECTIVE = re.compile(r'^\s*#\s*\|\s*(\S+)(.*)$')
def src_of(c): return ''.join(c['source']) if isinstance(c['source'], list) else c['source']
def set_src(c, s): c['source'] = s.splitlines(keepends=True)
def directives(s):
    "Leading `#|` directives of cell source `s`, as `(name, arg)`"
    res = []
    for l in s.splitlines():
        m = DIRECTIVE.match(l)
        if m: res.append((m.group(1), m.group(2).strip()))
        elif l.strip(): break
    return res
def masked(s):
    "Cell source `s` as Python: line magics unwrapped or commented, a cell magic makes the cell empty"
    if s.lstrip().startswith('%%'): return ''
    out = []
    for l in s.splitlines():
        st,ind = l.lstrip(),l[:len(l)-len(l.lstrip())]
        if st.startswith(('%time ', '%timeit ')): out.append(ind + st.split(None, 1)[1])
        elif st.startswith(('%', '!')): out.append(ind + '#' + st)
        else: out.append(l)
    return '\n'.join(out)
def parse(s, where):
    try: return ast.parse(masked(s))
    except SyntaxError as e: problem(f"{where}: cannot parse ({e.msg}, line {e.lineno}): left as it is"); return None

def all_names(tree):
    "What nbdev's `make_all` puts in `__all__` for these top-level statements"
    res = []
    for o in tree.body:
        if isinstance(o, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if not any(_decor_id(d).startswith('patch') for d in o.decorator_list): res.append(o.name)
        elif isinstance(o, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            ts = o.targets if isinstance(o, ast.Assign) else [o.target]
            if getattr(ts[0], 'id', None) == '_all_': res += [getattr(e, 'value', getattr(e, 'id', None)) for e in o.value.elts]; continue
            for t in ts: res += [getattr(e, 'id', None) for e in getattr(t, 'elts', [t])]
    return [n for n in dict.fromkeys(res) if n and not (n[0]=='_' and n not in _all_vals(tree))]
def _all_vals(tree):
    return {getattr(e, 'value', getattr(e, 'id', None)) for o in tree.body if isinstance(o, ast.Assign) and getattr(o.targets[0], 'id', None)=='_all_'
            for e in o.value.elts}
def _decor_id(d): return d.id if hasattr(d, 'id') else getattr(getattr(d, 'func', None), 'id', '')
def stmt_names(o): return all_names(ast.Module(body=[o], type_ignores=[]))

class Nb:
    def __init__(self, path):
        self.path,self.text = path,path.read_text()
        self.nb = json.loads(self.text)
        self.cells = self.nb['cells']
        self.module = next((a for c in self.cells if c['cell_type']=='code' for d,a in directives(src_of(c)) if d=='default_exp'), None)
    def code(self): return [c for c in self.cells if c['cell_type']=='code']
    def exp(self, c):
        "The directive that exports `c` and the module it exports to, or `(None, None)`"
        for d,a in directives(src_of(c)):
            if d in ('export', 'exports', 'exporti'): return d, (a or self.module)
        return None, None
    def write(self):
        new = json.dumps(self.nb, indent=1, ensure_ascii=False) + '\n'
        if json.loads(new) != json.loads(self.text): self.path.write_text(new); return True
        return False

def new_id(old, i): return hashlib.sha1(f'{old}/{i}'.encode()).hexdigest()[:8]

def narrow_cell(nb, c, mods):
    "Make `c` `exporti` when it defines no surface name, split it when it defines both; returns the cells that replace it"
    d,mod = nb.exp(c)
    if d not in ('export', 'exports') or mod not in mods: return [c]
    s = src_of(c)
    tree = parse(s, f"{nb.path.name}: an export cell")
    if tree is None: return [c]
    names = all_names(tree); where = f"{nb.path.name}: cell defining {', '.join(names[:4]) or '(no names)'}"
    surf = [n for n in names if n in SURFACE]
    if not names or len(surf)==len(names): return [c]
    if not surf: set_src(c, _retag(s, 'exporti')); change(f"{where}: export -> exporti" + ' + exec_doc'*_documented(s)); return [c]
    # both: split into runs of statements, each defining surface names only or helpers only; the others join their run
    lines = s.splitlines()
    first = min([tree.body[0].lineno] + [x.lineno for x in getattr(tree.body[0], 'decorator_list', [])]) - 1
    head = 0
    while head < first and (DIRECTIVE.match(lines[head]) or not lines[head].strip()): head += 1
    hdr = [l for l in lines[:head] if DIRECTIVE.match(l)]
    units = []  # [start line (0-based), end line (exclusive), kind]
    for o in tree.body:
        st = min([o.lineno] + [x.lineno for x in getattr(o, 'decorator_list', [])]) - 1
        ns = stmt_names(o)
        kind = 'S' if any(n in SURFACE for n in ns) else 'H' if ns else None
        if units and st < units[-1][1]:  # shares a line with the one before
            u = units[-1]; u[1] = o.end_lineno
            if kind and u[2] and kind != u[2]: u[2] = 'X'
            else: u[2] = u[2] or kind
        else: units.append([st, o.end_lineno, kind])
    if any(u[2]=='X' for u in units):
        problem(f"{where}: a surface name and helpers on one line: kept `#| export`, its helpers stay in `__all__`"); return [c]
    for i,u in enumerate(units):  # statements defining no public name go with the run before (the first with the run after)
        if u[2] is None: u[2] = units[i-1][2] if i else next((v[2] for v in units if v[2]), 'H')
    runs = []
    for i,u in enumerate(units):
        start = head if i==0 else units[i-1][1]
        end = len(lines) if i==len(units)-1 else u[1]
        if runs and runs[-1][2]==u[2]: runs[-1][1] = end
        else: runs.append([start, end, u[2]])
    res = []
    for i,(a,b,k) in enumerate(runs):
        body = '\n'.join(lines[a:b]).strip('\n')
        nc = json.loads(json.dumps(c)) if i else c
        if i: nc['id'] = new_id(c.get('id', ''), i)
        if 'outputs' in nc: nc['outputs'] = []
        set_src(nc, _retag('\n'.join(hdr + [body]), 'export' if k=='S' else 'exporti')); res.append(nc)
    change(f"{where}: split into {len(res)} cells ({'/'.join('export' if k=='S' else 'exporti' for *_,k in runs)})")
    return res

def _documented(s):
    "Whether nbdev would add `show_doc` entries for cell source `s` (a public def or class), which `#| exec_doc` keeps"
    try: t = ast.parse(masked(s))
    except SyntaxError: return False
    return KEEP_DOCS and any(isinstance(o, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (o.name[0]!='_' or o.name[:2]=='__') for o in t.body)

def _retag(s, to):
    "Change the first export directive of `s` to `to`"
    out, done = [], False
    for l in s.splitlines(keepends=True):
        m = DIRECTIVE.match(l.rstrip('\n'))
        if not done and m and m.group(1) in ('export', 'exports', 'exporti'):
            l = re.sub(r'(\|\s*)(exports|exporti|export)\b', lambda mm: mm.group(1)+to, l, count=1); done = True
            if to=='exporti' and _documented(s) and not any(d=='exec_doc' for d,_ in directives(s)): l = l.rstrip('\n') + '\n#| exec_doc' + '\n'*l.endswith('\n')
        out.append(l)
    return ''.join(out)

def module_alls(nbs):
    "`{module: __all__}` as nbdev computes it, and `{module: [every top-level public name]}` (export and exporti cells)"
    alls, defs = {}, {}
    for nb in nbs:
        for c in nb.code():
            d,mod = nb.exp(c)
            if not d: continue
            t = parse(src_of(c), f"{nb.path.name}: an export cell")
            if t is None: continue
            ns = all_names(t)
            defs.setdefault(mod, []).extend(ns)
            if d in ('export', 'exports'): alls.setdefault(mod, []).extend(ns)
    return {k: list(dict.fromkeys(v)) for k,v in alls.items()}, {k: list(dict.fromkeys(v)) for k,v in defs.items()}

# ---------- star imports and the names they no longer give
_ext = {}
def ext_names(mod):
    "What `from mod import *` gives, for a module outside this package"
    if mod not in _ext:
        try:
            m = importlib.import_module(mod)
            _ext[mod] = set(getattr(m, '__all__', None) or [k for k in dir(m) if not k.startswith('_')])
        except Exception as e: problem(f"cannot import {mod} to read its star names ({type(e).__name__}): names it gives are not known"); _ext[mod] = set()
    return _ext[mod]

class Stars:
    "What each star import gives before (`old`) and after (`new`) the change, and the module that defines each name"
    def __init__(self, old, new, defs, all_mods):
        self.old,self.new,self.defs,self.all_mods = old,new,defs,all_mods
    def gives(self, mod, name, when):
        "The cnn_cost module that `from mod import *` takes `name` from (`when` is 'old' or 'new'), True for another package, or None"
        alls = self.old if when=='old' else self.new
        if mod == f'{PKG}.all':
            return next((m for m in reversed(self.all_mods) if name in alls.get(m, ())), None)
        if mod.startswith(PKG + '.'):
            m = mod[len(PKG)+1:]
            return m if name in alls.get(m, ()) else None
        return True if name in ext_names(mod) else None
    def defining(self, mod, name):
        "Where `name` is defined at top level, among the modules `from mod import *` reaches"
        if mod == f'{PKG}.all': return next((m for m in reversed(self.all_mods) if name in self.defs.get(m, ())), None)
        if mod.startswith(PKG + '.'): m = mod[len(PKG)+1:]; return m if name in self.defs.get(m, ()) else None
        return None

def star_nodes(tree): return [o for o in tree.body if isinstance(o, ast.ImportFrom) and o.level==0 and any(a.name=='*' for a in o.names)]
def star_uses(src):
    "Names that `src` takes from its star imports (pyflakes' ImportStarUsage)"
    try: tree = ast.parse(src)
    except SyntaxError: return None
    w = checker.Checker(tree, filename='<surface>')
    return sorted({m.message_args[0] for m in w.messages if isinstance(m, messages.ImportStarUsage)})

def lost_names(src, stars, tree=None):
    "`{module: [names]}` that `src` took from a star import of cnn_cost and that it no longer gets"
    tree = tree or ast.parse(src)
    uses = star_uses(src) or []
    order = [o.module for o in star_nodes(tree)]
    res = {}
    for n in uses:
        old = next((g for g in (stars.gives(m, n, 'old') for m in reversed(order)) if g), None)
        if old is True: continue   # another package's name, and still its own
        if old is None:   # not given before either: a name lost in an earlier run that was not placed, or not ours
            y = next((stars.defining(m, n) for m in reversed(order) if stars.defining(m, n)), None)
            if y is None: continue
            if next((g for g in (stars.gives(m, n, 'new') for m in reversed(order)) if g), None): continue
        else:
            new = next((g for g in (stars.gives(m, n, 'new') for m in reversed(order)) if g), None)
            if new == old: continue
            y = old
        res.setdefault(y, []).append(n)
    return res

def _fmt_import(prefix, names, ind=''):
    s = f"{ind}{prefix}{', '.join(names)}"
    if len(s) <= 150: return s
    lines, cur = [], f"{ind}{prefix}("
    for i,n in enumerate(names):
        piece = n + (', ' if i < len(names)-1 else ')')
        if len(cur) + len(piece) > 150: lines.append(cur.rstrip()); cur = ind + '    '
        cur += piece
    return '\n'.join(lines + [cur])

def add_imports(src, need, anchor=None):
    "`src` with `from cnn_cost.Y import names` for each `{Y: names}` in `need`: merged into an existing top-level import of Y, else after line `anchor` (1-based; None: at the end)"
    for y,names in need.items():
        tree = ast.parse(masked(src)); lines = src.splitlines()
        mod = f'{PKG}.{y}'
        ex = next((o for o in tree.body if isinstance(o, ast.ImportFrom) and o.level==0 and o.module==mod and all(a.name!='*' for a in o.names)), None)
        if ex is not None:
            have = [a.name if a.asname is None else f'{a.name} as {a.asname}' for a in ex.names]
            new = have + [n for n in names if n not in have]
            first,last = lines[ex.lineno-1],lines[ex.end_lineno-1]
            txt = _fmt_import(f'from {mod} import ', new, first[:ex.col_offset]) + last[ex.end_col_offset:]
            lines[ex.lineno-1:ex.end_lineno] = txt.split('\n')
        else:
            at = len(lines) if anchor is None else anchor
            ind = re.match(r'\s*', lines[at-1]).group(0) if at and lines else ''
            # lines inserted before `anchor` move it on
            txt = _fmt_import(f'from {mod} import ', names, ind).split('\n')
            lines[at:at] = txt
            if anchor is not None: anchor += len(txt)
        src = '\n'.join(lines) + ('\n' if src.endswith('\n') else '')
    return src

def sorted_need(need, order): return {y: need[y] for y in sorted(need, key=lambda m: (order.index(m) if m in order else 99, m))}

# ---------- main
def main():
    nbs = [Nb(p) for p in sorted((root/'nbs').glob('*.ipynb')) if not p.name.startswith('_')]
    mod_nbs = [nb for nb in nbs if nb.module]
    # 3. all.py: every module but the command line, in the flow's order
    allpy = root/PKG/'all.py'
    old_all = allpy.read_text() if allpy.exists() else ''
    have = {nb.module for nb in mod_nbs} - set(NOT_IN_ALL)
    mods = [m for m in re.findall(r'^from \.(\w+) import \*', old_all, re.M) if m in have]   # all.py's order stays; a new module goes after
    for m in sorted(have - set(mods), key=lambda m: (FLOW.get(m, 9), m)):                     # the last one before it in the flow
        if m not in FLOW: problem(f"module {m} has no place in the flow (FLOW in tools/surface.py): put last in all.py")
        i = max([i+1 for i,o in enumerate(mods) if FLOW.get(o, 9) <= FLOW.get(m, 9)], default=0)
        mods.insert(i, m)
    hdr = next((l for l in old_all.splitlines() if l.startswith('#')), "# Everything in cnn_cost, in fastai's manner: `from cnn_cost.all import *`. Hand-written (not exported by nbdev), like fastai's own `all.py` files.")
    new_all = '\n'.join([hdr] + [f'from .{m} import *' for m in mods]) + '\n'
    if new_all != old_all: allpy.write_text(new_all); change(f"cnn_cost/all.py: star-imports {', '.join(mods)}")
    old_alls, defs = module_alls(mod_nbs)
    # 1. narrow the export cells
    for nb in mod_nbs:
        if nb.module not in mods: continue
        cells = []
        for c in nb.cells: cells += narrow_cell(nb, c, mods) if c['cell_type']=='code' else [c]
        nb.nb['cells'] = nb.cells = cells
    new_alls, _ = module_alls(mod_nbs)
    for n in SURFACE:
        where = [m for m in mods if n in new_alls.get(m, ())]
        if not where: problem(f"surface name {n} is defined in no module's `__all__`: left out")
    extra = {m: [n for n in new_alls.get(m, ()) if n not in SURFACE] for m in mods}
    for m,ns in extra.items():
        if ns: note(f"{m}.__all__ keeps non-surface names {ns}")
    stars = Stars(old_alls, new_alls, defs, mods)
    # 2a. each module's own code: explicit imports in its `#| export` import cell
    for nb in mod_nbs:
        exp_cells = [c for c in nb.code() if nb.exp(c)[0]]
        src = '\n'.join(masked(src_of(c)) for c in exp_cells)
        try: need = lost_names(src, stars)
        except SyntaxError: problem(f"{nb.path.name}: exported code does not parse: imports not checked"); continue
        _place(nb, need, exp_cells, 'module code')
    # 2b. the notebooks' tests, index and tutorial
    for nb in nbs:
        src = '\n'.join(masked(src_of(c)) for c in nb.code())
        try: need = lost_names(src, stars)
        except SyntaxError: problem(f"{nb.path.name}: does not parse as a whole: imports not checked"); continue
        if not need: continue
        if nb.module:
            tc = next((c for c in nb.code() if not nb.exp(c)[0] and 'from fastcore.test import *' in src_of(c)), None)
            if tc is None:
                tc = {'cell_type': 'code', 'execution_count': None, 'id': new_id(nb.path.name, 'imports'), 'metadata': {}, 'outputs': [], 'source': []}
                set_src(tc, '#| hide'); i = next((i for i,c in enumerate(nb.cells) if c['cell_type']=='code' and nb.exp(c)[0]), 0)
                nb.cells.insert(i+1, tc)
            need = sorted_need(need, mods)
            set_src(tc, add_imports(src_of(tc), need)); change(f"{nb.path.name}: test imports {_show(need)}")
        else: _place(nb, need, nb.code(), 'examples')
    # 4. the docs' home page
    idx = next((nb for nb in nbs if nb.path.name=='index.ipynb'), None)
    if idx is None: problem("nbs/index.ipynb not found: no API section")
    else: _api_section(idx, nbs)
    for nb in nbs:
        if nb.write(): change(f"wrote {nb.path.relative_to(root)}")
    # 2c. Python files
    for p in sorted([*(root/'tests').glob('*.py'), *(root/'bench').glob('*.py'), *(root/'tools').glob('*.py')]):
        if p.resolve() == Path(__file__).resolve(): continue
        src = p.read_text()
        if PKG not in src: continue
        try: tree = ast.parse(src)
        except SyntaxError: problem(f"{p.relative_to(root)}: does not parse: imports not checked"); continue
        need = sorted_need(lost_names(src, stars, tree), mods)
        if not need: continue
        new = src
        for y,ns in need.items():
            t = ast.parse(new)
            prov = [o for o in star_nodes(t) if o.module in (f'{PKG}.all', f'{PKG}.{y}')] or [o for o in star_nodes(t) if o.module.startswith(PKG)]
            new = add_imports(new, {y: ns}, prov[-1].end_lineno if prov else 0)
        p.write_text(new); change(f"{p.relative_to(root)}: imports {_show(need)}")
    # the flow, and private names across modules
    for nb in mod_nbs:
        for c in nb.code():
            if not nb.exp(c)[0]: continue
            t = parse(src_of(c), nb.path.name)
            for o in (t.body if t else []):
                if not (isinstance(o, ast.ImportFrom) and o.level==0 and (o.module or '').startswith(PKG + '.')): continue
                y = o.module[len(PKG)+1:]
                if FLOW.get(y, 9) > FLOW.get(nb.module, 9): note(f"flow: {nb.module} imports from {y}, which comes after it ({ast.unparse(o)[:100]})")
                priv = [a.name for a in o.names if a.name.startswith('_')]
                if priv: note(f"private names: {nb.module} imports {priv} from {y}")
    print('Changes:' if changes else 'No changes.')
    for s in changes: print('  ' + s)
    if notes: print('Notes:'); [print('  ' + s) for s in notes]
    if problems: print('NOT PLACED (do by hand):'); [print('  ' + s) for s in problems]
    n = sum(len(v) for m,v in new_alls.items() if m in mods)
    print(f"from {PKG}.all import * gives {n} of the package's names")
    return 1 if problems else 0

def _show(need): return '; '.join(f"{y}: {', '.join(ns)}" for y,ns in need.items())

def _place(nb, need, cells, what):
    "Add explicit imports for `need` after the star import of cnn_cost that gave them, in `cells` of `nb`"
    if not need: return
    need = sorted_need(need, list(FLOW))
    for y,ns in need.items():
        target = anchor = None
        for c in cells:   # the last star import of cnn_cost.all or of `y` itself
            t = parse(src_of(c), nb.path.name)
            prov = [o for o in star_nodes(t) if o.module in (f'{PKG}.all', f'{PKG}.{y}')] if t else []
            if prov: target,anchor = c,prov[-1].end_lineno
        if target is None: problem(f"{nb.path.name}: no star import of {PKG} found for {y}: {ns} ({what}) not placed"); continue
        set_src(target, add_imports(src_of(target), {y: ns}, anchor)); change(f"{nb.path.name}: {what} imports {y}: {', '.join(ns)}")

def _api_section(idx, nbs):
    from fastai.learner import Learner
    patches = set()
    for nb in nbs:
        for c in nb.code():
            if nb.exp(c)[0]: patches |= set(re.findall(r'def (\w+)\(self:\s*Learner', src_of(c))) | set(re.findall(r'Learner\.(\w+)\s*=', src_of(c)))
    md = [API_TITLE, "`from cnn_cost.all import *` brings these names and adds the `learn.` methods; the rest (formulas, thresholds, "
          "test doubles, the passes) stays importable from its module."]
    for g,lines in API.items():
        keep = []
        for l in lines:
            miss = [n for n in re.findall(r'learn\.(\w+)', l) if n not in patches and not hasattr(Learner, n)]
            if miss: problem(f"index: Learner.{', Learner.'.join(miss)} not found in the notebooks: line left out of the API section: {l[:60]}")
            else: keep.append(l)
        md += ['', f'**{g}**', ''] + [f'- {l}' for l in keep]
    text = '\n'.join(md)
    for n in SURFACE:
        if not re.search(rf'`@?{n}\b', text): problem(f"index: surface name {n} has no line in the API section")
    cell = next((c for c in idx.cells if c['cell_type']=='markdown' and src_of(c).startswith(API_TITLE)), None)
    if cell is not None:
        if src_of(cell) != text: set_src(cell, text); change("index: API section updated")
        return
    cell = {'cell_type': 'markdown', 'id': 'a91on1sc', 'metadata': {}, 'source': []}; set_src(cell, text)
    i = next((i for i,c in enumerate(idx.cells) if c['cell_type']=='markdown' and src_of(c).startswith('## What is measured')), None)
    if i is None: i = next((i for i,c in enumerate(idx.cells) if c['cell_type']=='markdown' and src_of(c).startswith('## Docs')), len(idx.cells))
    idx.cells.insert(i, cell); change("index: API section added")

if __name__ == '__main__': sys.exit(main())
