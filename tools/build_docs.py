"""Build the docs site into `doc_path` (docs/) from the notebooks: nbdev's processing, then Sphinx with myst-nb.

With `quarto` on the PATH this is just `nbdev-docs`. Without it (quarto can't be installed here) the notebooks go through
nbdev's own processing (`nbdev.serve.proc_nbs`: `show_doc` rendered, `#| hide` cells dropped, directives stripped, backticked
names linked by `NbdevLookup`, frontmatter made) into `_proc/`; each processed notebook is then staged for Sphinx (quarto's
cell options applied, `show_doc` output made page markdown with a docments parameter table, doc links made relative) and
Sphinx renders the stored outputs with myst-nb and pydata-sphinx-theme (`tools/sphinx/conf.py`): search, a contents list
on each page, copy buttons, light and dark. Offline. Usage: `python tools/build_docs.py [out]`; `DOCS_STRICT=1` fails on
any Sphinx warning (a broken link, an API name nbdev linked that has no entry)."""
import ast, os, posixpath, re, shutil, subprocess, sys, tempfile, yaml
from pathlib import Path

import nbformat, nbdev.doclinks

CONF = Path(__file__).parent/'sphinx'
_re_dir = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')

def quarto_docs():
    "Render with quarto as nbdev does, when it is installed"
    subprocess.run(['nbdev-docs'], check=True)

def proc_nbs(**kwargs):
    "nbdev's own processing of `nbs/` into `_proc/`, as `nbdev-proc-nbs` does it, minus the quarto install"
    from nbdev.config import get_config
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs as _proc
    cfg = get_config()
    os.chdir(cfg.config_path)
    refresh_quarto_yml()
    nbdev.doclinks._build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path, force=True)
    return cfg, _proc(cfg.nbs_path, n_workers=int(os.environ.get('DOCS_WORKERS', 2)), **kwargs)

def split_frontmatter(nb):
    "Pop the YAML frontmatter raw cell nbdev's `FrontmatterProc` wrote; return it as a dict"
    for i,c in enumerate(nb.cells):
        if c.cell_type=='raw' and c.source.lstrip().startswith('---'):
            nb.cells.pop(i)
            return yaml.safe_load(c.source.strip().strip('-')) or {}
    return {}

def _md(c): return next((''.join(o.data['text/markdown']) for o in c.get('outputs', []) if 'text/markdown' in o.get('data', {})), None)

def apply_quarto_opts(nb):
    "Apply the quarto cell options nbdev leaves for the renderer (`echo`, `output`, `include`), as myst-nb tags; `asis` output becomes markdown"
    cells = []
    for c in nb.cells:
        for k in [k for k in c if k not in ('cell_type','id','metadata','source','outputs','execution_count','attachments')]: del c[k]
        if c.cell_type!='code': cells.append(c); continue
        # Python warnings from imports (torch.jit deprecations in fastai...) are not page content: as quarto's `warning: false`
        c.outputs = [o for o in c.get('outputs', []) if not (o.get('name')=='stderr' and 'Warning' in o.get('text', ''))]
        lines,opts = c.source.splitlines(),{}
        while lines and (m:=_re_dir.match(lines[0])): opts[m.group(1).lower()] = m.group(2).lower(); lines.pop(0)
        c.source = '\n'.join(lines)
        c.metadata.pop('execution', None)
        if opts.get('include')=='false': continue
        if opts.get('output')=='asis' and opts.get('echo')=='false':  # `show_doc`: its markdown is part of the page, as in quarto
            md = _md(c)
            if md: cells.append(nbformat.v4.new_markdown_cell(md, metadata=dict(showdoc=c.source)))
            continue
        tags = set(c.metadata.get('tags', []))
        if opts.get('echo')=='false' or not c.source.strip(): tags.add('remove-input')
        if opts.get('output')=='false': tags.add('remove-output')
        c.metadata['tags'] = sorted(tags)
        cells.append(c)
    nb.cells = [c for c in cells if c.cell_type=='code' or c.source.strip()]
    for i,c in enumerate(nb.cells): c.id = f'c{i}'  # nbdev's processing gives new random ids each run: number them, so a rebuild changes nothing
    return nb

_re_head = re.compile(r'^(#{1,6}) (.+?)\s*$', re.M)
def _plain(s): return re.sub(r'[`*\\]', '', s).strip()

def one_heading(nb):
    "One heading per API entry: an entry shown twice (nbdev's automatic `show_doc` and the notebook's own) once; a section heading named as an entry in its section becomes the entry's heading, the entry moved up to it"
    cells,seen,keep = nb.cells,set(),[]
    def _sd(c): return 'showdoc' in c.metadata and (h:=_re_head.search(c.source)) and h
    for c in cells:
        if (h:=_sd(c)):
            if _plain(h.group(2)) in seen: continue
            seen.add(_plain(h.group(2)))
        keep.append(c)
    cells[:] = keep
    for c in list(cells):
        if c.cell_type!='markdown' or 'showdoc' in c.metadata or not (hd:=_re_head.search(c.source)) or c.source[:hd.start()].strip(): continue
        i = cells.index(c)
        for d in cells[i+1:]:
            if (h:=_sd(d)):
                if _plain(h.group(2))!=_plain(hd.group(2)): continue
                d.source = d.source[:h.start()] + hd.group(1) + ' ' + h.group(2) + d.source[h.end():]
                rest = c.source[hd.end():].strip()
                cells.remove(d)
                if rest: c.source = rest; cells.insert(i, d)  # the entry first, then the section's own prose
                else: cells[i] = d
                break
            if d.cell_type=='markdown' and (e:=_re_head.search(d.source)) and len(e.group(1))<=len(hd.group(1)): break  # the next section
    return nb

def slug(s):
    "A heading's anchor as pandoc (quarto) makes it, which nbdev's `_modidx.py` links to: `CostProfiler.after_fit` -> `costprofiler.after_fit`"
    s = re.sub(r'\s+', '-', re.sub(r'[^\w\s.-]', '', s.strip().lower()))
    return re.sub(r'^[^a-z]+', '', s) or 'section'

def showdoc_obj(c, mods):
    "The object a `show_doc` cell documents, looked up in the package's modules; None if not found"
    try:
        call = next(n for n in ast.walk(ast.parse(c.metadata['showdoc'])) if isinstance(n, ast.Call) and getattr(n.func, 'id', '')=='show_doc')
        expr = ast.unparse(call.args[0])
    except (StopIteration, SyntaxError, IndexError): return None
    for m in mods:
        try: return eval(expr, vars(m))
        except Exception: pass
    return None

def param_table(c, mods):
    "fastcore's docments table (`DocmentTbl`) for the symbol of a `show_doc` cell, looked up in the package's modules"
    from fastcore.docments import DocmentTbl
    if (o:=showdoc_obj(c, mods)) is None: return ''
    try: return DocmentTbl(o)._repr_markdown_()
    except Exception: return ''

def real_signature(md, o):
    "An Enum's members instead of `show_doc`'s `(*args, **kwds)`; a dataclass shown as a `class`, its default factories written out"
    import dataclasses, enum
    if isinstance(o, type) and issubclass(o, enum.Enum):
        base = next((b.__name__ for b in o.__mro__[1:] if issubclass(b, enum.Enum)), 'Enum')
        body = '\n'.join(f'    {k} = {v.value!r}' for k,v in o.__members__.items())
        return re.sub(r'```python\n.*?```', lambda m: f'```python\nclass {o.__name__}({base}):\n{body}\n```', md, count=1, flags=re.S)
    if isinstance(o, type) and dataclasses.is_dataclass(o):
        fac = {f.name: f.default_factory.__name__ for f in dataclasses.fields(o) if f.default_factory is not dataclasses.MISSING}
        def _sig(m):
            t = re.sub(r'^def ', 'class ', m.group(0), count=1, flags=re.M)
            t = re.sub(r'(\w+)(:[^,=\n]*)?=<factory>', lambda n: f'{n.group(1)}{n.group(2) or ""}=field(default_factory={fac.get(n.group(1), "...")})', t)
            return re.sub(r'\)->None:\n```$', '):\n```', t)
        return re.sub(r'```python\n.*?```', _sig, md, count=1, flags=re.S)
    return md

_re_cmt,_re_src = re.compile(r'^(\s+.*?,) # .*$|^\s+# .*\n', re.M),re.compile(r'^\[source\]\(\S+\)\{[^}]*\}\s*\n', re.M)
def showdoc_md(c, mods):
    "nbdev 3's `show_doc` markdown as a section of class `nbdev-showdoc`, docments moved from signature comments into a table, as nbdev 2 showed them"
    md = re.sub(r'^---\s*\n', '', c.source.lstrip())  # the rule between entries becomes the section's border: a section may not begin with one
    src = _re_src.search(md)
    if src: md = md.replace(src.group(0), '')
    if m:=re.search(r'^(#{1,6}) (.+)$', md, re.M):
        md = md[:m.start()] + '{.nbdev-showdoc}\n' + m.group(1) + ' ' + re.sub(r'([_*])', r'\\\1', m.group(2)) + '\n\n' + (src.group(0) if src else '') + md[m.end():]
    md = real_signature(md, showdoc_obj(c, mods))
    if not (tbl:=param_table(c, mods)): return md
    md = re.sub(r'```python\n.*?```', lambda m: _re_cmt.sub(lambda n: n.group(1) or '', m.group(0)), md, count=1, flags=re.S)
    md = re.sub(r'^(\):\s*|\)\s*->.*?:) # .*$', r'\1', md, flags=re.M)
    return md.rstrip() + '\n\n' + tbl

_re_link = re.compile(r'\[([^\]]*)\]\(([^)\s]+)\)(\{[^}]*\})?')
def localize(md, here, known, ctx):
    "nbdev's links to the published site as Sphinx cross-references: API names to their Python objects, pages to pages; dangling ones unlinked"
    site_url,syms,cfg = ctx
    def _doc(doc,anc=''): return f'{posixpath.relpath(doc, posixpath.dirname(here) or ".")}.ipynb' + (f'#{anc}' if anc else '')
    def _sub(m):
        txt,url,attrs = m.groups()
        if url.startswith('https://github.com/') and attrs and 'target' in attrs: return f'[{txt}]({url}){{.nbdev-source}}'  # show_doc's source link
        if url.startswith(site_url): url = url[len(site_url):]
        elif re.match(r'^[a-z]+:|^#', url): return m.group(0)
        elif (cfg.config_path/url).is_file(): return f'[{txt}]({cfg.git_url}/blob/{cfg.branch}/{url})'  # README links to the repository's files
        page,_,anc = url.partition('#')
        doc = posixpath.splitext(page)[0] or 'index'
        if doc not in known: return txt  # a page left out of this build
        if (sym:=syms.get(f'{page}#{anc}')) and re.fullmatch(r'`[^`]+`', txt): return f'{{py:obj}}`{txt[1:-1]} <{sym}>`'
        return f'[{txt}]({_doc(doc, anc)})'
    return _re_link.sub(_sub, md)

def page_order(proc, nbs_path):
    "Notebooks in the order of nbdev's `sidebar.yml` (index first, then tutorials), falling back to file order"
    sb = nbs_path/'sidebar.yml'
    names = []
    if sb.exists():
        def _walk(o):
            if isinstance(o, str): names.append(o)
            elif isinstance(o, list): [_walk(x) for x in o]
            elif isinstance(o, dict): [_walk(v) for k,v in o.items() if k not in ('section','text')]
        _walk(yaml.safe_load(sb.read_text())['website']['sidebar']['contents'])
    names = [n for n in names if n.endswith('.ipynb') and (proc/n).exists()]
    names += sorted(str(p.relative_to(proc)) for p in proc.rglob('*.ipynb') if str(p.relative_to(proc)) not in names)
    return sorted(names, key=lambda n: (n!='index.ipynb', not is_tutorial(n)))

def is_tutorial(name): return 'tutorial' in name.lower()

def toctree(caption, docs): return f'```{{toctree}}\n:hidden:\n:caption: {caption}\n\n' + '\n'.join(docs) + '\n```' if docs else ''

def stage(cfg, proc, src, names):
    "Processed notebooks from `proc` into `src`, as Sphinx's source: one notebook per page, named as its `output-file`"
    import importlib
    sys.path.insert(0, str(cfg.config_path))  # the package the notebooks export, for its docments
    site_url = f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip('/') + '/'
    idx = _modidx()['syms']
    mods = {m:importlib.import_module(m) for m in idx}
    home = {m:{v[0].split('.html')[0] for v in d.values()} for m,d in idx.items()}  # the pages each module's symbols are on
    syms = nbdev_urls()
    pages = {}
    for name in names:
        nb = nbformat.read(proc/name, as_version=4)
        fm = split_frontmatter(nb)
        doc = posixpath.join(posixpath.dirname(name), Path(fm.get('output-file', Path(name).with_suffix('.html').name)).stem).lstrip('./')
        apply_quarto_opts(nb)
        ms = sorted(mods.values(), key=lambda m: doc not in home[m.__name__])
        for c in nb.cells:
            if 'showdoc' in c.metadata: c.source = showdoc_md(c, ms)
        one_heading(nb)
        for c in nb.cells: c.metadata.pop('showdoc', None)
        title,desc = fm.get('title', Path(name).stem),nbdev.doclinks.NbdevLookup().linkify(fm.get('description', ''))
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(f'# {title}' + (f'\n\n{{.description}}\n{desc}' if desc else '')))
        nb.metadata['language_info'] = {'name': 'python'}
        pages[doc] = nb
    if 'index' not in pages: pages = {'index': nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f'# {cfg.title}\n\n{cfg.description}')]), **pages}
    for doc,nb in pages.items():
        for c in nb.cells:
            if c.cell_type=='markdown': c.source = localize(c.source, doc, pages, (site_url, syms, cfg))
            for o in c.get('outputs', []):
                if 'text/markdown' in o.get('data', {}): o.data['text/markdown'] = localize(''.join(o.data['text/markdown']), doc, pages, (site_url, syms, cfg))
    docs = [d for d in pages if d!='index']
    pages['index'].cells.append(nbformat.v4.new_markdown_cell(
        toctree('Tutorials', [d for d in docs if is_tutorial(d)]) + '\n\n' + toctree('API', [d for d in docs if not is_tutorial(d)])))
    for doc,nb in pages.items():
        (src/doc).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, src/f'{doc}.ipynb')
    for f in proc.rglob('*'):  # any image files the notebooks link to
        if f.suffix.lower() in ('.png','.jpg','.jpeg','.gif','.svg') and not f.name.startswith('.'):
            (src/f.relative_to(proc)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, src/f.relative_to(proc))
    return list(pages)

def nbdev_urls():
    "nbdev's `page.html#anchor` of each name in `_modidx.py` -> the name, qualified"
    res = {}
    for d in _modidx()['syms'].values():
        for k,(url,_) in d.items(): res.setdefault(url, k)
    return res

def _modidx():
    "The package's symbol index (`_modidx.py`), as nbdev's doc links read it"
    from nbdev.config import get_config
    cfg = get_config()
    g = {}
    exec((cfg.lib_path/'_modidx.py').read_text(), g)
    return g['d']

def build(out=None, skip_file_re=None):
    "Build the site into `out` (default: `doc_path`); `skip_file_re` leaves out notebooks, as nbdev's `--skip_file_re` does"
    if shutil.which('quarto') and not os.environ.get('DOCS_NO_QUARTO'): return quarto_docs()
    kw = dict(skip_file_re=skip_file_re) if skip_file_re else {}
    cfg,proc = proc_nbs(**kw)
    keep = {str(p.relative_to(cfg.nbs_path)) for p in nbdev.doclinks.nbglob(cfg.nbs_path, func=Path, **kw)}
    out = Path(out or cfg.doc_path).absolute()
    if (out/'.git').exists() or out==cfg.config_path: raise ValueError(f'refusing to replace {out}')
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)/'src'
        stage(cfg, proc, src, [n for n in page_order(proc, cfg.nbs_path) if n in keep])
        from sphinx.cmd.build import build_main
        html = Path(tmp)/'html'  # myst-nb writes its `jupyter_execute/` beside the output folder: keep both in `tmp`
        args = ['-b', 'html', '-q', '-E', '-c', str(CONF), '-d', str(Path(tmp)/'doctrees'), str(src), str(html)]
        if build_main(args + ['-W', '--keep-going'] * bool(os.environ.get('DOCS_STRICT'))): raise SystemExit('sphinx-build failed')
        if out.exists(): shutil.rmtree(out)
        shutil.move(html, out)
    for f in [out/'.buildinfo', out/'_static/webpack-macros.html', *out.rglob('*.map')]: f.unlink(missing_ok=True)  # rebuild stamp, a theme template, source maps
    if (out/'_sources').exists() and not any((out/'_sources').iterdir()): (out/'_sources').rmdir()
    (out/'.nojekyll').touch()
    return out

if __name__=='__main__':
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('out', nargs='?', help='where the site goes (default: doc_path from pyproject.toml)')
    ap.add_argument('--skip_file_re', help='skip notebooks whose file name matches this regex')
    build(**vars(ap.parse_args()))
