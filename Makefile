# The notebooks in nbs/ are the source: edit them, then `make export` (package + clean metadata) and `make test`.
.PHONY: export readme test test-nbs test-py test-slow test-all sync-check docs bench gpu-wheels gpu-dry-run

export:
	nbdev-export && nbdev-clean

# README.md from nbs/index.ipynb (nbdev-readme where quarto is installed; else nbdev's processing + nbconvert).
readme:
	python tools/make_readme.py

# Before each commit: every notebook (nbdev-test, skipping cells flagged slow/cuda/notest), then pytest without the tests marked `slow`
# (pyproject's addopts); a few minutes on 2 cores. `make test-slow` runs the slow ones, `make test-all` everything (what CI runs).
test: test-nbs test-py

test-nbs:
	nbdev-test --n-workers 1

test-py:
	python -m pytest -q tests

test-slow:
	python -m pytest -q tests -m slow

test-all: test-nbs
	python -m pytest -q tests -m "slow or not slow"

# CI fails when nbdev-export or nbdev-clean would change a committed file (as nbdev's own CI does).
sync-check:
	nbdev-export && nbdev-clean && git status --porcelain -- nbs cnn_cost README.md && test -z "$$(git status --porcelain -- nbs cnn_cost README.md)"

# The docs site in docs/ from the notebooks, offline: nbdev-docs where quarto is installed, else nbdev's processing + Sphinx (myst-nb,
# pydata-sphinx-theme; tools/build_docs.py, settings in tools/sphinx/conf.py). Open docs/index.html, or serve docs/ for the search.
docs:
	python tools/build_docs.py

# The CUDA half in one command on a lent GPU machine (bench/gpu_check.py, through bench/gpu_check.sh). Here: `make gpu-wheels` (fastai, nbdev and
# their pure-Python needs as wheels for the GPU image's Python 3.12 in .whl/, which .gitignore ignores; the list of ../shared/gpu/prepare-wheels.sh
# plus nbdev's) and `make gpu-dry-run` (the same command on the CPU, CUDA-only checks skipped); then the device call `bash bench/gpu_check.sh`
# with carry [".whl"], its results under $$OUT.
GPU_WHEELS = fastai==2.8.12 fastcore fastprogress fastdownload fasttransform "plum-dispatch<2.10" beartype \
	nbdev==3.3.26 execnb==0.3.4 ipython==9.18.1 ipython-pygments-lexers jedi parso matplotlib-inline pexpect ptyprocess prompt_toolkit \
	wcwidth stack_data executing asttokens pure_eval traitlets decorator astunparse fastgit ghapi fastspec fasttransport watchdog
gpu-wheels:
	mkdir -p .whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $(GPU_WHEELS)
	du -sh .whl

gpu-dry-run:
	bash bench/gpu_check.sh --dry-run --out bench/out/gpu-dry
