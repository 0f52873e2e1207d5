"The `cnn-cost` command, run as a user would."
import json, re, subprocess, sys, pytest
from pathlib import Path
from cnn_cost.data import digits_folder

CMD = Path(sys.executable).parent/'cnn-cost'  # the script installed beside this python, also when its venv is not activated

def run(*args):
    return subprocess.run([str(CMD) if CMD.exists() else 'cnn-cost', *args], capture_output=True, text=True, timeout=600)

def test_default_json():
    r = run('--format', 'json', '--n-repeat', '2', '--n-warmup', '0')
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d['totals']['total_macs'] == 2_224_930_816 and d['input_shapes'] == [[64, 3, 28, 28]]

def test_path_plot_csv(tmp_path):
    p = digits_folder(tmp_path/'imgs', n_per_class=8)
    r = run('--path', str(p), '--arch', 'mobilenet_v2', '--size', '32', '--bs', '16', '--format', 'csv', '--n-repeat', '1',
            '--plot', str(tmp_path/'p.png'), '--roofline', str(tmp_path/'r.png'))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith('name,type,kind,output_shape') and len(lines) > 100
    assert (tmp_path/'p.png').stat().st_size > 10_000 and (tmp_path/'r.png').stat().st_size > 10_000

@pytest.mark.parametrize('args,msg', [(['--arch', 'resnet19'], 'Unknown architecture'), (['--path', '/no/such'], 'is not a folder'),
                                      (['--format', 'xml'], 'unknown --format')])
def test_bad_input(args, msg):
    r = run(*args)
    assert r.returncode != 0 and msg in r.stderr and 'Traceback' not in r.stderr

def test_stderr_clean_and_markdown_readable(tmp_path):
    "Not on a terminal: no progress-bar redraws and no torchvision deprecation warnings on stderr; markdown counts as the text table writes them"
    p = digits_folder(tmp_path/'imgs', n_per_class=4)
    r = run('--path', str(p), '--arch', 'mobilenet_v2', '--size', '32', '--bs', '8', '--format', 'markdown', '--n-repeat', '1', '--n-warmup', '0')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    rows = [l for l in r.stdout.splitlines() if l.startswith('| ') and 'Conv2d' in l]
    assert len(rows) == 52 and not re.search(r'\de[+-]\d\d|\.\d{4,}', r.stdout), r.stdout[:2000]
    assert re.search(r'\| \d+(\.\d)?[KMG] ', r.stdout) and '- Total params: 2,236,682' in r.stdout

def test_html_readable():
    r = run('--format', 'html', '--n-repeat', '1', '--n-warmup', '0', '--bs', '8')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert r.stdout.startswith('<!DOCTYPE html>') and '<table' in r.stdout and not re.search(r'\de[+-]\d\d|\.\d{4,}', r.stdout)
    assert re.search(r'>\s*\d+(\.\d)?[KMG]\s*<', r.stdout)

def test_memory_markdown_readable():
    "--memory as markdown: bytes written as the text table writes them, not raw integers"
    r = run('--memory', '--bs', '32', '--format', 'markdown')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert r.stdout.startswith('| name') and ' MB ' in r.stdout and not re.search(r'\|\s*\d{5,}\s*\|', r.stdout), r.stdout[:1500]

def test_max_batch_plan():
    "--max-batch-gib with a --bs that does not fit prints the largest batch and the plan that makes --bs fit"
    r = run('--max-batch-gib', '0.2', '--bs', '128')
    assert r.returncode == 0, r.stderr
    assert 'Largest batch that fits in 0.2 GiB' in r.stdout and 'Memory plan: Sequential at batch 128 in 0.2 GiB on cuda' in r.stdout
    assert 'Suggestion: ' in r.stdout and 'mixed precision' in r.stdout and 'checkpointing' in r.stdout
