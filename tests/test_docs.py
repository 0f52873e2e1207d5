"""The docs site, built from the notebooks and opened in a real browser (headless Chromium driven by selenium).

Builds the site with `tools/build_docs.py` into a temporary folder, serves it on 127.0.0.1, opens every page, and checks:
no console errors, the page's tables and images are there (as many `<img>`, all decoded, as the processed notebook has image
outputs; a `<table>` for each HTML or markdown table in it), every nav link resolves to a built page, and the nav lists every page.
Saves screenshots of the tutorial page to `tests/out/`. Skips when Chromium or chromedriver is missing (`.ci/run` installs them)."""
import functools, http.server, json, os, re, shutil, subprocess, sys, threading
from pathlib import Path
from urllib.parse import urljoin, urlparse
from urllib.request import urlopen

import pytest

ROOT = Path(__file__).parents[1]
OUT = Path(__file__).parent/'out'
CHROME = shutil.which('chromium') or shutil.which('chromium-browser')
DRIVER = shutil.which('chromedriver')
pytestmark = pytest.mark.skipif(not (CHROME and DRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

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
    handler = functools.partial(Quiet, directory=str(out))
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
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
              '--disable-component-update', '--disable-sync', '--window-size=1280,1600', f'--user-data-dir={tmp_path_factory.mktemp("chrome")}']:
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield drv
    drv.quit()

def pages(out): return sorted(str(p.relative_to(out)) for p in out.rglob('*.html'))

def expected(out):
    "Per page: image outputs and HTML-table outputs of the processed notebook it was rendered from (`_proc/`)"
    res = {}
    for nbp in (ROOT/'_proc').rglob('*.ipynb'):
        nb = json.loads(nbp.read_text())
        fm = next((c for c in nb['cells'] if c['cell_type']=='raw' and 'output-file' in ''.join(c['source'])), None)
        name = next(l.split(':',1)[1].strip() for l in ''.join(fm['source']).splitlines() if l.startswith('output-file')) if fm else nbp.stem+'.html'
        mds = [''.join(c['source']) for c in nb['cells'] if c['cell_type']=='markdown']
        outs = [o for c in nb['cells'] if c['cell_type']=='code' and '#| output: false' not in ''.join(c['source']) for o in c.get('outputs', [])]
        datas = [o.get('data', {}) for o in outs]
        res[str(nbp.parent.relative_to(ROOT/'_proc')/name).lstrip('./')] = dict(
            imgs=sum('image/png' in d or 'image/jpeg' in d for d in datas),
            tables=sum('<table' in ''.join(d.get('text/html', '')) for d in datas)
                  + sum(bool(_re_mdtable.search(''.join(m))) for m in mds + [d.get('text/markdown', '') for d in datas]))
    return res

_re_mdtable = re.compile(r'^\|?\s*:?-{3,}:?\s*\|', re.M)  # a markdown table's separator row (show_doc's docments table)

def console_errors(drv): return [e for e in drv.get_log('browser') if e['level'] in ('SEVERE', 'ERROR')]

def test_site_has_pages(site):
    out,_ = site
    ps = pages(out)
    assert 'index.html' in ps and 'tutorial.html' in ps, ps
    api = {'summary.html', 'counting.html', 'timing.html', 'learner.html', 'core.html', 'data.html'}
    assert api <= set(ps), api - set(ps)
    assert (out/'site_libs/nbconvert-lab.css').exists() and (out/'styles.css').exists()
    assert sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) < 10e6

def test_pages_in_browser(site, browser):
    out,url = site
    exp,ps,problems = expected(out),pages(out),[]
    browser.get_log('browser')
    for p in ps:
        browser.get(urljoin(url, p))
        errs = console_errors(browser)
        if errs: problems.append(f'{p}: console errors {errs}')
        title = browser.execute_script("return document.querySelector('h1.title') && document.querySelector('h1.title').textContent")
        if not title: problems.append(f'{p}: no page title')
        imgs = browser.execute_script("return [...document.querySelectorAll('main img')].map(i => [i.complete, i.naturalWidth])")
        n_tables = browser.execute_script("return document.querySelectorAll('main table').length")
        if any(not c or w==0 for c,w in imgs): problems.append(f'{p}: images not decoded {imgs}')
        e = exp.get(p)
        if e:
            if len(imgs) < e['imgs']: problems.append(f"{p}: {len(imgs)} <img>, notebook has {e['imgs']} image outputs")
            if n_tables < e['tables']: problems.append(f"{p}: {n_tables} <table>, notebook has {e['tables']} HTML table outputs")
        elif p!='index.html': problems.append(f'{p}: no processed notebook found for it')
        nav = browser.execute_script("return [...document.querySelectorAll('nav.site-nav a')].map(a => a.href)")
        targets = {urlparse(h).path.lstrip('/') or 'index.html' for h in nav}
        if targets != set(ps): problems.append(f'{p}: nav links {sorted(targets)} != pages {ps}')
        for h in nav:
            with urlopen(h) as r:
                r.read()
                if r.status!=200: problems.append(f'{p}: nav link {h} -> {r.status}')
        links = browser.execute_script("return [...document.querySelectorAll('main a[href]')].map(a => a.href)")
        for h in links:  # links between pages (doc links, prev/next) must resolve too
            u = urlparse(h)
            if h.startswith(url) and u.path.endswith('.html') and not (out/u.path.lstrip('/')).exists(): problems.append(f'{p}: broken link {h}')
    assert not problems, '\n'.join(problems)

def test_tutorial_page(site, browser):
    out,url = site
    browser.get(urljoin(url, 'tutorial.html'))
    assert not console_errors(browser)
    n_tables = browser.execute_script("return document.querySelectorAll('main table').length")
    imgs = browser.execute_script("return [...document.querySelectorAll('main img')].map(i => i.naturalWidth)")
    assert n_tables >= 1 and len(imgs) >= 1 and all(w > 100 for w in imgs), (n_tables, imgs)
    text = browser.execute_script("return document.querySelector('main').innerText")
    assert 'Where does a CNN compute?' in text and 'rank correlation of per-layer time with MACs' in text
    assert not browser.execute_script("return [...document.querySelectorAll('.jp-InputArea pre')].some(p => /^\\s*#\\|/m.test(p.textContent))")  # directives stripped
    assert browser.execute_script("return document.querySelectorAll('.jp-InputArea pre').length") > 5
    OUT.mkdir(exist_ok=True)
    browser.save_screenshot(str(OUT/'tutorial.png'))
    browser.execute_script("document.querySelector('main img').scrollIntoView()")
    browser.save_screenshot(str(OUT/'tutorial_plot.png'))
    assert (OUT/'tutorial.png').stat().st_size > 10_000
