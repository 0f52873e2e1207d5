"""Sphinx settings for the docs site: `tools/build_docs.py` stages nbdev's processed notebooks and runs Sphinx with this folder as `-c`.

myst-nb renders the notebooks with their stored outputs (nothing is executed), pydata-sphinx-theme gives the layout (search,
"On this page" contents, light and dark), sphinx-copybutton the copy buttons. `setup` adds what nbdev's `_modidx.py` knows:
each documented name is a Python object in Sphinx's index (so search lists it first), and names in code link to their entries."""
import html, posixpath, re, sys
from docutils import nodes
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parents[1]))
import build_docs as bd
from nbdev.config import get_config

cfg = get_config()
project = html_title = cfg.title
author = copyright = cfg.author or cfg.lib_name

extensions = ['myst_nb', 'sphinx_copybutton']
exclude_patterns = ['**.ipynb_checkpoints']
nb_execution_mode = 'off'           # the notebooks' stored outputs: tables, plots
nb_render_markdown_format = 'myst'  # markdown outputs (`Markdown(df.to_markdown())`) may hold tables
nb_merge_streams = True
myst_enable_extensions = ['attrs_inline', 'attrs_block', 'colon_fence', 'dollarmath']
myst_heading_anchors = 6
myst_heading_slug_func = 'build_docs.slug'  # the anchors nbdev's doc links point at, as quarto makes them
suppress_warnings = ['myst.header']  # pages with `show_doc` entries (H3) and no H2, as nbdev writes them
nitpicky = True  # an API name nbdev linked that has no entry is reported

html_theme = 'pydata_sphinx_theme'
html_static_path,templates_path,html_css_files = ['_static'],['_templates'],['cnn_cost.css']
html_sidebars = {'**': ['site-nav']}  # every page in the left sidebar, in notebook order, as nbdev's sidebar
html_copy_source = html_show_sourcelink = html_show_sphinx = html_use_index = False
html_favicon = '_static/favicon.svg'
html_context = dict(default_mode='auto')  # light or dark as the reader's system is, until they pick one
html_theme_options = dict(
    navbar_center=[], navbar_persistent=['search-button-field'], navbar_end=['theme-switcher', 'navbar-icon-links'],
    secondary_sidebar_items=['page-toc'], show_toc_level=2, search_as_you_type=True, footer_start=['copyright'], footer_end=[],
    icon_links=[dict(name='GitHub', url=cfg.git_url, icon='fa-brands fa-github')] if cfg.git_url else [])
copybutton_selector = 'div.cell_input div.highlight pre, div.highlight-python > div.highlight pre, div.highlight-sh > div.highlight pre'
copybutton_exclude = '.linenos, .gp, .go'

def _syms():
    "nbdev's symbol index as {qualified name: Python object type}, and {name: qualified name} for names a reader writes bare"
    types,bare = {},{}
    for mod,d in bd._modidx()['syms'].items():
        for k in d:
            nm = k[len(mod)+1:]
            types[k] = 'method' if '.' in nm else 'class' if nm[:1].isupper() else 'function'
            if '.' not in nm and not nm.startswith('_'): bare.setdefault(nm, k)
    return types,bare

def note_objects(app, doctree):
    "Each `show_doc` entry becomes a Python object, its qualified name its anchor (as autodoc's): search lists it, `{py:obj}` links resolve to it"
    py,doc = app.env.get_domain('py'),app.env.docname
    for sec in doctree.findall(nodes.section):
        if 'nbdev-showdoc' not in sec['classes']: continue
        k = app.config.nbdev_urls.get(f'{doc}.html#{bd.slug(sec[0].astext())}')
        if k and k not in py.objects: sec['ids'].insert(0, k); py.note_object(k, app.config.nbdev_types[k], k, location=sec)

_re_name = re.compile(r'(?<!<span class="o">\.</span>)<span class="n">(\w+)</span>')
def link_code(app, pagename, templatename, context, doctree):
    "Names of the package's functions and classes in code cells link to their entries, as nbdev links them in prose"
    if 'body' not in context: return
    objs = app.env.get_domain('py').objects
    def _href(nm):
        if not (o:=objs.get(app.config.nbdev_bare.get(nm))): return None
        return ('' if o.docname==pagename else posixpath.relpath(o.docname, posixpath.dirname(pagename) or '.') + '.html') + '#' + o.node_id
    def _block(m):
        def _a(n): return f'<a class="nbdev-code-link" href="{html.escape(h)}">{n.group(0)}</a>' if (h:=_href(n.group(1))) else n.group(0)
        return _re_name.sub(_a, m.group(0))
    context['body'] = re.sub(r'<div class="highlight"><pre>.*?</pre>', _block, context['body'], flags=re.S)

def setup(app):
    types,bare = _syms()
    app.add_config_value('nbdev_types', types, 'env'); app.add_config_value('nbdev_urls', bd.nbdev_urls(), 'env'); app.add_config_value('nbdev_bare', bare, 'env')
    app.connect('doctree-read', note_objects)
    app.connect('html-page-context', link_code)
    return dict(parallel_read_safe=False)
