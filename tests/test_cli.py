"The `cnn-cost` command, run as a user would."
import json, re, subprocess, sys, pytest
from types import SimpleNamespace
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

@pytest.mark.slow  # a CLI subprocess beyond the smoke test `test_default_json`
def test_path_plot_csv(tmp_path):
    p = digits_folder(tmp_path/'imgs', n_per_class=8)
    r = run('--path', str(p), '--arch', 'mobilenet_v2', '--size', '32', '--bs', '16', '--format', 'csv', '--n-repeat', '1',
            '--plot', str(tmp_path/'p.png'), '--roofline', str(tmp_path/'r.png'))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith('name,type,kind,output_shape') and len(lines) > 100
    assert (tmp_path/'p.png').stat().st_size > 10_000 and (tmp_path/'r.png').stat().st_size > 10_000

def one_line_usage_error(r):
    "The command refused its arguments as argparse does: exit code 2, one line on stderr, no traceback, nothing on stdout"
    assert r.returncode == 2 and r.stdout == '' and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr, (r.returncode, r.stderr)

@pytest.mark.slow  # a CLI subprocess beyond the smoke test `test_default_json`
def test_bad_input():
    "As a user runs it: the installed command refuses `--bs 0` with its real stderr (every other kind runs in-process below)"
    r = run('--memory', '--bs', '0')
    one_line_usage_error(r)
    assert '--bs 0' in r.stderr

def bad_folders(tmp):
    "Data folders `cnn-cost --path` cannot use, each with the argument its error names"
    empty,afile = tmp/'empty',tmp/'a.png'
    empty.mkdir(); afile.write_bytes(digits_folder(tmp/'one', n_per_class=1).joinpath('train/0/0.png').read_bytes())
    broken = digits_folder(tmp/'broken', n_per_class=2); (broken/'train'/'3'/'bad.png').write_text('not an image')
    small = digits_folder(tmp/'small', n_per_class=2)
    return [empty, afile, tmp/'missing', broken, small]

def main_exit(args, capsys):
    "`cnn_cost.cli.main(args)` in this process: its exit code and stderr"
    from cnn_cost.cli import main
    with pytest.raises(SystemExit) as e: main([str(a) for a in args])
    out,err = capsys.readouterr()
    return SimpleNamespace(returncode=e.value.code, stdout=out, stderr=err)

BAD_ARGS = [['--bs', '0'], ['--bs', '-3'], ['--bs', 'x'], ['--memory', '--bs', '0'], ['--max-batch-gib', '1', '--bs', '-1'],
            ['--size', '0'], ['--size', '-28'], ['--size', '100000'], ['--sweep', '28,100000', '--bs', '4'], ['--arch', 'vit_b_16', '--size', '28'], ['--arch', 'resnet19'], ['--format', 'xml'],
            ['--n-repeat', '0'], ['--n-warmup', '-1'], ['--max-batch-gib', '0'], ['--max-batch-gib', '-2'], ['--max-batch-gib', 'nan'],
            ['--max-batch-gib', 'inf'], ['--dtype', 'int8', '--memory'], ['--dtype', 'fp16'], ['--sweep', '28,x'], ['--sweep', '0,28'],
            ['--sweep', '28', '--memory'], ['--roofline', 'r.png', '--memory'], ['--device', 'gpu'], ['--device', 'meta'],
            ['--plot', 'p.txt'], ['--plot', '/no/such/dir/p.png'], ['--roofline', '.'], ['--unknown']]

@pytest.mark.parametrize('args', BAD_ARGS, ids=' '.join)
def test_bad_args_one_line(args, capsys, monkeypatch):
    "Every kind of wrong argument: exit 2 and one line naming the argument, before any work (no learner is built)"
    import cnn_cost.cli as cli
    monkeypatch.setattr(cli, 'build_learner', lambda *a, **k: pytest.fail('work started before the arguments were checked'))
    r = main_exit(args, capsys)
    one_line_usage_error(r)
    assert re.search(r'--[a-z]', r.stderr.split('error:')[1]), r.stderr  # it names an argument to change

def test_bad_folders_one_line(tmp_path, capsys, monkeypatch):
    "Unusable data folders: empty, a file, missing, an image PIL cannot identify, fewer images than one batch: exit 2 naming --path"
    import cnn_cost.cli as cli
    monkeypatch.setattr(cli, 'build_learner', lambda *a, **k: pytest.fail('work started before the folder was checked'))
    for p in bad_folders(tmp_path):
        for extra in ([], ['--memory', '--bs', '9'])[:1 if p.name=='small' else 2]:  # a prediction takes 8 images: the small folder has 16
            r = main_exit(['--path', p, *extra], capsys)
            one_line_usage_error(r)
            assert f'--path {p}' in r.stderr
    r = main_exit(['--path', tmp_path/'broken', '--bs', '4'], capsys)
    assert 'bad.png' in r.stderr  # names the file to remove

def test_undecodable_image_one_line(tmp_path, capsys):
    "An image PIL identifies but cannot decode (truncated) is met only when the loader reads it: still exit 2, naming the file"
    p = digits_folder(tmp_path/'trunc', n_per_class=1, size=200)
    f = p/'train'/'3'/'0.png'; f.write_bytes(f.read_bytes()[:f.stat().st_size//3])
    r = main_exit(['--path', p, '--bs', '8', '--n-repeat', '1'], capsys)
    one_line_usage_error(r)
    assert 'train/3/0.png' in r.stderr

@pytest.mark.slow  # a CLI subprocess beyond the smoke test `test_default_json`
def test_stderr_clean_and_markdown_readable(tmp_path):
    "Not on a terminal: no progress-bar redraws and no torchvision deprecation warnings on stderr; markdown counts as the text table writes them"
    p = digits_folder(tmp_path/'imgs', n_per_class=4)
    r = run('--path', str(p), '--arch', 'mobilenet_v2', '--size', '32', '--bs', '8', '--format', 'markdown', '--n-repeat', '1', '--n-warmup', '0')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    rows = [l for l in r.stdout.splitlines() if l.startswith('| ') and 'Conv2d' in l]
    assert len(rows) == 52 and not re.search(r'\de[+-]\d\d|\.\d{4,}', r.stdout), r.stdout[:2000]
    assert re.search(r'\| \d+(\.\d)?[KMG] ', r.stdout) and '- Total params: 2,236,682' in r.stdout

@pytest.mark.slow  # a CLI subprocess beyond the smoke test `test_default_json`
def test_html_readable():
    r = run('--format', 'html', '--n-repeat', '1', '--n-warmup', '0', '--bs', '8')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert r.stdout.startswith('<!DOCTYPE html>') and '<table' in r.stdout and not re.search(r'\de[+-]\d\d|\.\d{4,}', r.stdout)
    assert re.search(r'>\s*\d+(\.\d)?[KMG]\s*<', r.stdout)

@pytest.mark.slow  # a CLI subprocess beyond the smoke test `test_default_json`
def test_memory_markdown_readable():
    "--memory as markdown: bytes written as the text table writes them, not raw integers"
    r = run('--memory', '--bs', '32', '--format', 'markdown')
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert r.stdout.startswith('| name') and ' MB ' in r.stdout and not re.search(r'\|\s*\d{5,}\s*\|', r.stdout), r.stdout[:1500]

@pytest.mark.slow  # a CLI subprocess beyond the smoke test `test_default_json`
def test_max_batch_plan():
    "--max-batch-gib with a --bs that does not fit prints the largest batch and the plan that makes --bs fit"
    r = run('--max-batch-gib', '0.2', '--bs', '128')
    assert r.returncode == 0, r.stderr
    assert 'Largest batch that fits in 0.2 GiB' in r.stdout and 'Memory plan: Sequential at batch 128 in 0.2 GiB on cuda' in r.stdout
    assert 'Suggestion: ' in r.stdout and 'mixed precision' in r.stdout and 'checkpointing' in r.stdout
