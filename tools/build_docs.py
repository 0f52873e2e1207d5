"""Build the docs site into `doc_path` (docs/) from the notebooks, the way nbdev does.

With `quarto` on the PATH this is just `nbdev-docs`. Without it (quarto can't be installed here) the notebooks go through
nbdev's own processing (`nbdev.serve.proc_nbs`: `show_doc` rendered, `#| hide` cells dropped, exported-code flags and
nbdev directives stripped, frontmatter made) into `_proc/`, and each processed notebook is rendered by nbconvert's HTML
exporter inside a small layout (`tools/docs_template/`) that adds the nav sidebar. Usage: `python tools/build_docs.py`."""
import os, re, shutil, subprocess, sys, yaml
from pathlib import Path
from html import escape as html_escape

import nbformat, nbdev.doclinks
from nbconvert import HTMLExporter
from traitlets.config import Config

TPL = Path(__file__).parent/'docs_template'
_re_dir = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')

def quarto_docs():
    "Render with quarto as nbdev does, when it is installed"
    subprocess.run(['nbdev-docs'], check=True)

def proc_nbs(**kwargs):
    "nbdev's own processing of `nbs/` into `_proc/`, as `nbdev-proc-nbs` does it, minus the quarto install"
    from nbdev.config import get_config
    from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
    from nbdev.serve import proc_nbs as _proc
    import nbdev.doclinks
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

def apply_quarto_opts(nb):
    "Apply the quarto cell options nbdev leaves for the renderer (`echo`, `output`, `include`), then strip them"
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
        tags = set(c.metadata.get('tags', []))
        if opts.get('echo')=='false' or not c.source.strip(): tags.add('remove_input')
        if opts.get('output')=='false': tags.add('remove_output')
        c.metadata['tags'] = sorted(tags)
        cells.append(c)
    nb.cells = [c for c in cells if c.cell_type=='code' or c.source.strip()]
    for i,c in enumerate(nb.cells): c.id = f'c{i}'  # nbdev's processing gives new random ids each run: number them, so a rebuild changes nothing
    return nb

def page_order(proc, nbs_path):
    "Notebooks in the order of nbdev's `sidebar.yml` (index first), falling back to file order"
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
    return sorted(names, key=lambda n: n!='index.ipynb')

def exporter():
    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_input_tags = {'remove_input'}
    c.TagRemovePreprocessor.remove_all_outputs_tags = {'remove_output'}
    c.TagRemovePreprocessor.remove_cell_tags = {'remove_cell'}
    c.HTMLExporter.anchor_link_text = '#'
    c.HTMLExporter.exclude_input_prompt = c.HTMLExporter.exclude_output_prompt = True
    return HTMLExporter(config=c, template_file=str(TPL/'site_page.html.j2'))

def readme_nb(cfg):
    "A stand-in home page from README.md while `index.ipynb` does not exist yet"
    readme = cfg.config_path/'README.md'
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(readme.read_text() if readme.exists() else f'# {cfg.lib_name}')]
    return nb

def build(out=None, skip_file_re=None):
    "Build the site into `out` (default: `doc_path`); `skip_file_re` leaves out notebooks, as nbdev's `--skip_file_re` does"
    if shutil.which('quarto') and not os.environ.get('DOCS_NO_QUARTO'): return quarto_docs()
    kw = dict(skip_file_re=skip_file_re) if skip_file_re else {}
    cfg,proc = proc_nbs(**kw)
    keep = {str(p.relative_to(cfg.nbs_path)) for p in nbdev.doclinks.nbglob(cfg.nbs_path, func=Path, **kw)}
    out = Path(out or cfg.doc_path)
    site_url = f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip('/') + '/'
    pages = []
    for name in [n for n in page_order(proc, cfg.nbs_path) if n in keep]:
        nb = nbformat.read(proc/name, as_version=4)
        fm = split_frontmatter(nb)
        href = str(Path(name).parent/fm.get('output-file', Path(name).with_suffix('.html').name))
        pages.append(dict(nb=nb, fm=fm, href=href, title=str(fm.get('title', Path(name).stem)).replace('`', '')))
    if not any(p['href']=='index.html' for p in pages):
        pages.insert(0, dict(nb=readme_nb(cfg), fm={}, href='index.html', title=cfg.get('title', cfg.lib_name)))
    pages[0]['title'] = 'Home' if pages[0]['href']=='index.html' else pages[0]['title']
    nav = [dict(href=p['href'], title=p['title']) for p in pages]
    if (out/'.git').exists() or out==cfg.config_path: raise ValueError(f'refusing to replace {out}')
    if out.exists(): shutil.rmtree(out)
    (out/'site_libs').mkdir(parents=True)
    ex = exporter()
    for i,p in enumerate(pages):
        fm = p['fm']
        desc = re.sub(r'`([^`]+)`', r'<code>\1</code>', html_escape(str(fm.get('description', cfg.get('description', '')))))  # inline code only
        site = dict(title=cfg.get('title', cfg.lib_name), pages=nav, href=p['href'], root='../'*p['href'].count('/'),
                    page_title=fm.get('title', cfg.get('title', cfg.lib_name)), description=desc,
                    prev=nav[i-1] if i>0 else None, next=nav[i+1] if i+1<len(nav) else None)
        p['nb'].metadata['title'] = f"{site['page_title']} – {site['title']}"
        html,_ = ex.from_notebook_node(apply_quarto_opts(p['nb']), resources=dict(site=site))
        html = html.replace(f'href="{site_url}', f'href="{site["root"]}')  # nbdev's doc links point at the published site
        dest = out/p['href']
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(html)
        print(f'{dest} ({len(html)//1024} KB)')
    css = next(Path(d)/'lab/static/index.css' for d in ex.template_paths if (Path(d)/'lab/static/index.css').exists())
    (out/'site_libs/nbconvert-lab.css').write_text(css.read_text() + '\n' + (css.parent/'theme-light.css').read_text())
    shutil.copy(TPL/'layout.css', out/'site_libs/layout.css')
    for f in proc.rglob('*'):  # styles.css and any image files the notebooks link to
        if f.suffix.lower() in ('.css','.png','.jpg','.jpeg','.gif','.svg') and not f.name.startswith('.'):
            (out/f.relative_to(proc)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, out/f.relative_to(proc))
    (out/'.nojekyll').touch()
    return out

if __name__=='__main__':
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('out', nargs='?', help='where the site goes (default: doc_path from pyproject.toml)')
    ap.add_argument('--skip_file_re', help='skip notebooks whose file name matches this regex')
    build(**vars(ap.parse_args()))
