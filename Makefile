# Every target installs first when needed, so a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= test,train,ray
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install test test-slow lint format serve bench-server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: an unpinned torch would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: install
	$(PY) -m pytest -q -m "slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

serve: install
	$(VENV)/bin/reefcap serve --host $(HOST) --port $(PORT)

# The caption server under load (concurrency 1, 8, 32) against a transformers pipeline, in one run.
bench-server: install
	$(PY) -m reefcap.server.bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
