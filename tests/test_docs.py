"""Tests of the docs: the site built from the notebooks, opened in a real browser, and the times the docs store."""
# --- The docs site in a browser ---
# The docs site, built from the notebooks and opened in a real browser (headless Chromium driven by selenium).
#
# Builds the site with `tools/build_docs.py` (nbdev's processing, then Sphinx) into a temporary folder, serves it on 127.0.0.1
# and checks, as a reader would find it: every page opens with no console errors, its tables and plots there and decoded (as many
# `<img>` as the processed notebook has image outputs, a `<table>` for each of its tables), the sidebar lists every page in
# notebook order, every internal link resolves, anchors included, and every page has a contents list whose entries resolve;
# searching "CostProfiler" lists the callback page and opening the result lands on it; every documented name is in the search
# index; API names link to their entries in prose and in code, `show_doc` entries have docments parameter tables, code has copy
# buttons, the theme switches to dark; no script, stylesheet or font comes from another host. Screenshots of the home page and
# of an API page go to `tests/out/`. Skips when Chromium or chromedriver is missing (`.ci/run` installs them).
import functools, http.server, json, os, re, shutil, subprocess, sys, threading
from pathlib import Path
from urllib.parse import urljoin, urlparse, unquote

import pytest

ROOT = Path(__file__).parents[1]
OUT = Path(__file__).parent/'out'
CHROME = shutil.which('chromium') or shutil.which('chromium-browser')
DRIVER = shutil.which('chromedriver')
chrome = pytest.mark.skipif(not (CHROME and DRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "Build the docs into a temporary folder and serve it on 127.0.0.1"
    out = tmp_path_factory.mktemp('site')/'docs'
    env = dict(os.environ, DOCS_NO_QUARTO='1')
    skip = ['--skip_file_re', os.environ['DOCS_SKIP_FILE_RE']] if os.environ.get('DOCS_SKIP_FILE_RE') else []  # local use only
    r = subprocess.run([sys.executable, str(ROOT/'tools/build_docs.py'), str(out)] + skip, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode==0, f'docs build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(out)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield out, f'http://127.0.0.1:{srv.server_port}/'
    srv.shutdown()

@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROME
    for a in ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
              '--disable-component-update', '--disable-sync', '--window-size=1400,1000', f'--user-data-dir={tmp_path_factory.mktemp("chrome")}']:
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()

def pages(out): return sorted(str(p.relative_to(out)) for p in out.rglob('*.html') if p.name!='search.html' and not p.relative_to(out).parts[0].startswith('_'))

def frontmatter(nb):
    c = next((c for c in nb['cells'] if c['cell_type']=='raw' and 'output-file' in ''.join(c['source'])), None)
    return dict(l.split(':', 1) for l in ''.join(c['source']).splitlines() if ':' in l) if c else {}

def page_of(nbp):
    "The page a processed notebook in `_proc/` is rendered to"
    name = frontmatter(json.loads(nbp.read_text())).get('output-file', nbp.stem+'.html').strip()
    return str(nbp.parent.relative_to(ROOT/'_proc')/name).lstrip('./')

_re_mdtable = re.compile(r'^\|?\s*:?-{3,}:?\s*\|', re.M)  # a markdown table's separator row

def expected():
    "Per page: image outputs and tables (HTML outputs, markdown cells and outputs) of the processed notebook it was rendered from"
    res = {}
    for nbp in (ROOT/'_proc').rglob('*.ipynb'):
        nb = json.loads(nbp.read_text())
        mds = [''.join(c['source']) for c in nb['cells'] if c['cell_type']=='markdown']
        outs = [o for c in nb['cells'] if c['cell_type']=='code' and '#| output: false' not in ''.join(c['source']) for o in c.get('outputs', [])]
        datas = [o.get('data', {}) for o in outs]
        res[page_of(nbp)] = dict(
            imgs=sum('image/png' in d or 'image/jpeg' in d for d in datas),
            tables=sum('<table' in ''.join(d.get('text/html', '')) for d in datas)
                  + sum(bool(_re_mdtable.search(''.join(m))) for m in mds + [''.join(d.get('text/markdown', '')) for d in datas]))
    return res

def nav_order(out):
    "The order the sidebar must follow, from the notebooks present: home, tutorials, then the rest in file order"
    nbs = sorted(p for p in (ROOT/'nbs').rglob('*.ipynb') if not p.name.startswith(('_', '.')) and '.ipynb_checkpoints' not in p.parts)
    names = [page_of(ROOT/'_proc'/p.relative_to(ROOT/'nbs')) for p in nbs if (ROOT/'_proc'/p.relative_to(ROOT/'nbs')).exists()]
    names = [n for n in names if (out/n).exists()]
    return sorted(names, key=lambda n: (n!='index.html', 'tutorial' not in n))

def console_errors(drv): return [e for e in drv.get_log('browser') if e['level'] in ('SEVERE', 'ERROR')]

@chrome
@pytest.mark.slow  # builds the whole docs site (Sphinx over every notebook); the browser tests drive Chromium
def test_site_files(site):
    out,_ = site
    ps = pages(out)
    assert 'index.html' in ps and 'tutorial.html' in ps, ps
    api = {'summary.html', 'counting.html', 'timing.html', 'learner.html', 'core.html', 'data.html', 'callback.html'}
    assert api <= set(ps), api - set(ps)
    assert (out/'search.html').exists() and (out/'searchindex.js').exists() and (out/'.nojekyll').exists()
    assert sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) < 10e6
    ext = []  # offline: every script, stylesheet, font and image is served by the site itself
    for p in out.rglob('*.html'):
        h = p.read_text()
        for tag in re.findall(r'<(?:script|link|img|source|iframe)\b[^>]*>', h):
            ext += [f'{p.name}: {tag[:120]}' for u in re.findall(r'\b(?:src|href)="([^"]*)"', tag)
                    if re.match(r'(https?:)?//', u) and not re.search(r'rel="(canonical|alternate)"', tag)]
        ext += [f'{p.name}: @import {u}' for u in re.findall(r'@import\s+(?:url\()?["\']?((?:https?:)?//[^"\')]+)', h)]
    for p in out.rglob('*.css'): ext += [f'{p.name}: {u}' for u in re.findall(r'url\(\s*["\']?((?:https?:)?//[^"\')]+)', p.read_text())]
    assert not ext, '\n'.join(ext)

@chrome
@pytest.mark.slow  # builds the whole docs site (Sphinx over every notebook); the browser tests drive Chromium
def test_one_heading_per_entry_and_real_signatures(site):
    "No page shows a heading twice under its title (a section named as its entry, or an entry shown twice); an Enum shows its members, a dataclass is a `class`"
    out,_ = site
    dups = {}
    for p in pages(out):
        hs = [re.sub(r'<[^>]+>|#', '', h).strip() for h in re.findall(r'<h[2-6][^>]*>(.*?)</h[2-6]>', (out/p).read_text(), re.S)]  # the page title aside
        hs = [h for h in hs if '(Input shape:' not in h]  # a stored summary's own header (two summaries of one model) is output, not an entry
        if d:=sorted({h for h in hs if hs.count(h)>1}): dups[p] = d
    assert not dups, dups
    text = lambda p: re.sub(r'<[^>]+>', '', (out/p).read_text()).replace('&#39;', "'")
    mem,core = text('memory.html'),text('core.html')
    assert '*args, **kwds' not in mem and "class MemKind(Enum):" in mem and "param = 'parameters'" in mem
    assert 'class LayerRecord(' in core and 'def LayerRecord(' not in core and '<factory>' not in core and '&lt;factory&gt;' not in core
    assert 'shapes:list=field(default_factory=list)' in core

@chrome
@pytest.mark.slow  # builds the whole docs site (Sphinx over every notebook); the browser tests drive Chromium
def test_search_index_has_every_entry(site):
    "Every `show_doc` entry is a Python object in Sphinx's search index, so searching any documented name lists it first"
    out,_ = site
    idx = json.loads(re.search(r'Search\.setIndex\((.*)\)\s*$', (out/'searchindex.js').read_text(), re.S).group(1))
    objs = {f'{pre}.{nm}' if pre else nm for pre,d in idx['objects'].items() for nm in ([o[4] for o in d] if isinstance(d, list) else d)}
    entries = set()
    for nbp in (ROOT/'_proc').glob('*.ipynb'):
        if not (out/page_of(nbp)).exists(): continue
        for c in json.loads(nbp.read_text())['cells']:
            src = ''.join(c['source'])
            if c['cell_type']=='code' and 'show_doc(' in src:
                md = ''.join(''.join(o.get('data', {}).get('text/markdown', '')) for o in c.get('outputs', []))
                if m:=re.search(r'^#{1,6} (\S+)', md, re.M): entries.add(m.group(1))
    assert len(entries) > 20, entries
    missing = [e for e in entries if not any(o==e or o.endswith('.'+e) for o in objs)]
    assert not missing, missing

@chrome
@pytest.mark.slow  # builds the whole docs site (Sphinx over every notebook); the browser tests drive Chromium
def test_pages_in_browser(site, browser):
    out,url = site
    exp,ps,problems,ids,links = expected(),pages(out),[],{},{}
    order = nav_order(out)
    browser.get_log('browser')
    for p in ps:
        browser.get(urljoin(url, p))
        if errs:=console_errors(browser): problems.append(f'{p}: console errors {errs}')
        if not browser.execute_script("return document.querySelector('article h1')?.textContent"): problems.append(f'{p}: no page title')
        imgs = browser.execute_script("return [...document.querySelectorAll('article img')].map(i => [i.complete, i.naturalWidth])")
        if any(not c or w==0 for c,w in imgs): problems.append(f'{p}: images not decoded {imgs}')
        n_tables = browser.execute_script("return document.querySelectorAll('article table').length")
        if e:=exp.get(p):
            if len(imgs) < e['imgs']: problems.append(f"{p}: {len(imgs)} <img>, notebook has {e['imgs']} image outputs")
            if n_tables < e['tables']: problems.append(f"{p}: {n_tables} <table>, notebook has {e['tables']} tables")
        else: problems.append(f'{p}: no processed notebook found for it')
        nav = [urlparse(h).path.lstrip('/') or 'index.html' for h in browser.execute_script("return [...document.querySelectorAll('nav.bd-docs-nav a')].map(a => a.href)")]
        if nav!=order: problems.append(f'{p}: sidebar {nav} != notebook order {order}')
        n_secs = browser.execute_script("return document.querySelectorAll('article section section').length")
        toc = browser.execute_script("return [...document.querySelectorAll('nav.page-toc a')].map(a => a.href)")
        if n_secs>1 and len(toc)<2: problems.append(f'{p}: {n_secs} sections but no contents list')
        ids[p] = set(browser.execute_script("return [...document.querySelectorAll('[id]')].map(e => e.id)"))
        links[p] = browser.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
    for p,hs in links.items():  # every internal link: the page exists, and so does the element its anchor names
        for h in hs:
            u = urlparse(h)
            if not h.startswith(url): continue
            target = u.path.lstrip('/') or 'index.html'
            if not (out/target).is_file(): problems.append(f'{p}: broken link {h}'); continue
            if u.fragment and target in ids and unquote(u.fragment) not in ids[target]: problems.append(f'{p}: link to a missing anchor {h}')
    assert not problems, '\n'.join(problems)

def wait(drv, js, timeout=20, msg=''):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(drv, timeout).until(lambda d: d.execute_script(js), msg)

@chrome
@pytest.mark.slow  # builds the whole docs site (Sphinx over every notebook); the browser tests drive Chromium
def test_search(site, browser):
    "Searching as a reader does, from the search box: 'CostProfiler' lists the callback page, and its result opens it"
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    out,url = site
    browser.get(urljoin(url, 'index.html'))
    browser.find_element(By.CSS_SELECTOR, 'button.search-button-field').click()
    box = wait(browser, "const i = document.querySelector('#pst-search-dialog input[name=q]'); return i && i.offsetParent ? i : null")
    box.send_keys('CostProfiler', Keys.ENTER)
    wait(browser, "return location.pathname.endsWith('search.html')")
    hits = wait(browser, "const a = [...document.querySelectorAll('#search-results li a')]; return a.length ? a.map(a => a.href) : null")
    cb = [h for h in hits if urlparse(h).path.endswith('/callback.html')]
    assert cb, hits
    assert not console_errors(browser)
    # Sphinx keeps adding results while it searches: click once the summary says it finished (a click earlier can hit a re-rendered list)
    wait(browser, "return document.querySelector('#search-results .search-summary')?.textContent || null", 60)
    browser.find_element(By.CSS_SELECTOR, f'#search-results li a[href="{cb[0][len(url):]}"]').click()
    wait(browser, "return location.pathname.endsWith('/callback.html') && document.readyState=='complete'", 60)
    assert browser.execute_script("return document.querySelector('article h1').textContent").startswith('CostProfiler')
    frag = unquote(urlparse(browser.current_url).fragment)
    assert not frag or browser.execute_script("return !!document.getElementById(arguments[0])", frag), browser.current_url

@chrome
@pytest.mark.slow  # builds the whole docs site (Sphinx over every notebook); the browser tests drive Chromium
def test_api_page(site, browser):
    "An API page as nbdev shows it: entries with parameter tables, names linked to their entries in prose and code, copy buttons, dark"
    out,url = site
    browser.get(urljoin(url, 'callback.html'))
    # waited for, not read at once: once in CI (under load) the entry was not there right after `get`, though the page has it
    entry = wait(browser, "return document.readyState=='complete' && location.pathname.endsWith('/callback.html') && "
                          "document.getElementById('cnn_cost.callback.CostProfiler')", 60, 'no CostProfiler entry')
    rows = browser.execute_script("return [...arguments[0].closest('section').querySelectorAll('table tbody tr td:first-child')].map(t => t.textContent.trim())", entry)
    assert {'skip', 'n_batches', 'every'} <= set(rows), rows
    prose = browser.execute_script("return [...document.querySelectorAll('article p a.reference.internal')].map(a => a.href)")
    assert any('#cnn_cost.' in h for h in prose), prose
    code = browser.execute_script("return [...document.querySelectorAll('article div.highlight pre a.nbdev-code-link')].map(a => a.href)")
    assert code and all('#cnn_cost.' in h for h in code), code
    n_code = browser.execute_script("return document.querySelectorAll('div.cell_input div.highlight pre').length")
    n_btn = browser.execute_script("return document.querySelectorAll('div.cell_input button.copybtn').length")
    assert n_code > 3 and n_btn==n_code, (n_code, n_btn)
    OUT.mkdir(exist_ok=True)
    browser.execute_script("arguments[0].scrollIntoView()", entry)
    browser.save_screenshot(str(OUT/'api_callback.png'))
    browser.get(urljoin(url, code[0][len(url):]))  # a name in code lands on its entry
    assert browser.execute_script("return !!document.getElementById(arguments[0])", unquote(urlparse(code[0]).fragment))
    from selenium.webdriver.common.by import By
    browser.find_element(By.CSS_SELECTOR, 'article').click()
    browser.execute_script("window.scrollTo(0, 0)")
    browser.find_element(By.CSS_SELECTOR, '.bd-header button.theme-switch-button').click()  # the light/dark menu
    wait(browser, "return document.querySelector('.bd-header button.theme-change-button[data-mode=dark]').offsetParent")
    browser.find_element(By.CSS_SELECTOR, '.bd-header button.theme-change-button[data-mode=dark]').click()
    assert browser.execute_script("return document.documentElement.dataset.theme")=='dark'
    bg = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert sum(map(int, re.findall(r'\d+', bg)[:3])) < 200, bg
    browser.save_screenshot(str(OUT/'api_dark.png'))
    browser.execute_script("localStorage.clear()")

@chrome
@pytest.mark.slow  # builds the whole docs site (Sphinx over every notebook); the browser tests drive Chromium
def test_home_and_tutorial(site, browser):
    out,url = site
    browser.get(urljoin(url, 'index.html'))
    assert not console_errors(browser)
    OUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUT/'home.png'))
    assert (OUT/'home.png').stat().st_size > 10_000
    browser.get(urljoin(url, 'tutorial.html'))
    assert not console_errors(browser)
    n_tables = browser.execute_script("return document.querySelectorAll('article table').length")
    imgs = browser.execute_script("return [...document.querySelectorAll('article img')].map(i => i.naturalWidth)")
    assert n_tables >= 1 and len(imgs) >= 1 and all(w > 100 for w in imgs), (n_tables, imgs)
    text = browser.execute_script("return document.querySelector('article').innerText")
    assert 'Where does a CNN compute?' in text and 'rank correlation of per-layer time with MACs' in text
    assert not browser.execute_script("return [...document.querySelectorAll('div.cell_input pre')].some(p => /^\\s*#\\|/m.test(p.textContent))")  # directives stripped
    assert browser.execute_script("return document.querySelectorAll('div.cell_input pre').length") > 5
    browser.save_screenshot(str(OUT/'tutorial.png'))
    browser.execute_script("document.querySelector('article img').scrollIntoView()")
    browser.save_screenshot(str(OUT/'tutorial_plot.png'))

# --- Times stored in the docs ---
# The times stored in the docs come from quiet runs: every stored summary in nbs/*.ipynb and README.md prints the run-queue
# wait of its timed passes, under `cpu_wait_max`, and no note that its row times are disturbed.
#
# Fails until the notebooks that store times are re-run on an idle machine (after the change that added the run-queue line it fails
# until then): on an idle machine, with /work/venv/bin (or the project's environment) first on PATH,
#     for nb in index 05_learner 06_callback 07_plots 08_analysis 10_tutorial; do
#       jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 nbs/$nb.ipynb; done
#     nbdev-clean && make readme && make docs && python -m pytest -q tests/test_docs.py -k stored
# 07_plots and 08_analysis store times only in plots and tables (no printed summary), which this test cannot read: re-run them alike.
import json, re, pytest
from pathlib import Path
from cnn_cost.timing import cpu_wait_max

root = Path(__file__).parents[1]
handmade = {'03_summary.ipynb'}  # summaries of hand-made records: no run behind their times
timed = ['05_learner.ipynb', '06_callback.ipynb', '10_tutorial.ipynb', 'index.ipynb']  # notebooks whose stored outputs print measured summaries
wait_re = re.compile(r'^\s*Timing: .*CPU wait ([\d.]+)%', re.M)  # the summary's one `Timing:` fact line
disturbed = ['Disturbed:', 'Hooks slow:', 'precision not stated, disturbed']  # the conditions a disturbed run prints

def _texts(nb):
    "Plain-text outputs of a notebook"
    for c in json.loads(nb.read_text())['cells']:
        for o in c.get('outputs', []):
            t = ''.join(o.get('text', '')) or ''.join(o.get('data', {}).get('text/plain', ''))
            if t: yield t

def _summaries(text):
    "Stored `CostSummary` totals in `text`: chunks that show measured times"
    return [text] if (' over rows' in text or 'Timing:' in text) else []  # an old layout ('summed over rows') has no `Timing:` line: it fails

def _stored():
    res = [(p.name, s) for p in sorted((root/'nbs').glob('*.ipynb')) if p.name not in handmade for t in _texts(p) for s in _summaries(t)]
    return res + [('README.md', s) for s in _summaries((root/'README.md').read_text())]

@pytest.mark.parametrize('name,text', _stored(), ids=lambda v: v if isinstance(v, str) and v.endswith(('.ipynb','.md')) else '')
def test_stored_summary_is_quiet(name, text):
    ws = wait_re.findall(text)
    assert ws, f"{name}: a stored summary shows times without the run-queue wait of its run: re-run the notebook on a quiet machine"
    assert all(float(w) <= 100*cpu_wait_max for w in ws), f"{name}: stored times from a disturbed run (run-queue wait {ws}%): re-run it quiet"
    for d in disturbed: assert d not in text, f"{name}: a stored summary says '{d}': re-run it on a quiet machine"

@pytest.mark.parametrize('name', timed)
def test_timed_notebooks_store_a_quiet_summary(name):
    assert any(wait_re.search(t) for t in _texts(root/'nbs'/name)), f"{name}: no stored summary with its run-queue wait: re-run it on a quiet machine"

def test_checker_catches_disturbed():
    "The checks themselves: a disturbed or unlabelled summary fails, a quiet one passes"
    ok = "Forward on cpu: 83.00 ms over rows; whole pass 84.00 ms hooked, 83.50 ms plain; 9 passes\nTiming: rows known to ±2.0% (median of 4 after 0 warm-up); CPU wait 0.3%; hooks x1.01"
    test_stored_summary_is_quiet('x', ok)
    for bad in [ok.replace('0.3%', '101.0%'), ok.split('\n')[0], ok + '\nDisturbed: this process waited ...', 'Forward time on cpu: 83.0 ms summed over rows\nCPU run-queue wait: 0.3%']:
        with pytest.raises(AssertionError): test_stored_summary_is_quiet('x', bad)
