# make setup | test | demo | bench | docs | docs-serve | lint | format
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BACKENDS := tensorflow jax torch
STAMP := $(VENV)/.installed

.PHONY: setup test unit integration demo bench docs docs-serve lint format clean

setup: $(STAMP)

# Rebuilt only when the project's requirements change; later calls reuse .venv.
$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint docs
	$(PY) tests/run_backends.py $(BACKENDS)

demo: setup
	$(PY) examples/quickstart.py
	$(PY) examples/movielens.py
	$(PY) examples/tweets.py

# The site, from docs/ and the docstrings; --strict turns any warning (a broken
# link, a docstring griffe cannot read) into a failure.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build site *.egg-info
