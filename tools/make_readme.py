"""Make README.md from `nbs/index.ipynb`, as `nbdev-readme` does.

`nbdev-readme` renders with quarto, which can't be installed here: with `quarto` on the PATH we call it; otherwise the
index notebook goes through nbdev's own processing (`nbdev.serve.proc_nbs`, as for the docs site) and nbconvert's
markdown exporter. Plots become PNG files in `README_files/`. Usage: `python tools/make_readme.py`."""
import os, shutil, subprocess, sys
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter
sys.path.insert(0, str(Path(__file__).parent))
from build_docs import split_frontmatter, apply_quarto_opts
from traitlets.config import Config

def exporter():
    "nbconvert's markdown exporter, honouring the tags `apply_quarto_opts` gives for `echo: false` and `output: false`"
    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_input_tags = {'remove-input'}
    c.TagRemovePreprocessor.remove_all_outputs_tags = {'remove-output'}
    return MarkdownExporter(config=c)

def make_readme():
    if shutil.which('quarto') and not os.environ.get('DOCS_NO_QUARTO'): return subprocess.run(['nbdev-readme'], check=True)
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    cfg = get_config()
    os.chdir(cfg.config_path)
    proc_nbs(cfg.nbs_path, n_workers=0, file_glob=cfg.readme_nb)
    nb = nbformat.read(cfg.config_path/'_proc'/cfg.readme_nb, as_version=4)
    fm = split_frontmatter(nb)
    nb.metadata['language_info'] = {'name': 'python'}  # fenced code blocks tagged python
    ex = exporter()
    md,res = ex.from_notebook_node(apply_quarto_opts(nb), resources=dict(output_files_dir='README_files'))
    head = f"# {fm.get('title', cfg.lib_name)}\n\n" + (f"> {fm['description']}\n\n" if fm.get('description') else '')
    files = Path('README_files')
    if files.exists(): shutil.rmtree(files)
    for name,data in res.get('outputs', {}).items():
        Path(name).parent.mkdir(parents=True, exist_ok=True); Path(name).write_bytes(data)
    Path('README.md').write_text(head + md.strip() + '\n')

if __name__=='__main__': make_readme()
