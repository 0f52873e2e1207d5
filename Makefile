# The notebooks in nbs/ are the source: edit them, then `make export` (package + clean metadata) and `make test`.
.PHONY: export readme test test-nbs test-py sync-check docs bench

export:
	nbdev-export && nbdev-clean

# README.md from nbs/index.ipynb (nbdev-readme where quarto is installed; else nbdev's processing + nbconvert).
readme:
	python tools/make_readme.py

# The whole test suite: every notebook (nbdev-test, skipping cells flagged slow/cuda/notest), then pytest.
test: test-nbs test-py

test-nbs:
	nbdev-test --n-workers 1

test-py:
	python -m pytest -q tests

# CI fails when nbdev-export or nbdev-clean would change a committed file (as nbdev's own CI does).
sync-check:
	nbdev-export && nbdev-clean && git status --porcelain -- nbs cnn_cost README.md && test -z "$$(git status --porcelain -- nbs cnn_cost README.md)"

# The docs site in docs/ from the notebooks, offline: nbdev-docs where quarto is installed, else nbdev's processing + Sphinx (myst-nb,
# pydata-sphinx-theme; tools/build_docs.py, settings in tools/sphinx/conf.py). Open docs/index.html, or serve docs/ for the search.
docs:
	python tools/build_docs.py
