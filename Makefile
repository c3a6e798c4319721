# Every target installs first when needed, so a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= test,train,ray,postgres
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install test test-fast test-slow lint format serve bench bench-server bench-server-naive gpu-wheels gpu-check gpu-check-dry clean

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

# The quick loop while editing: also leaves out the tests that start Ray, Chromium, accelerate, Java or qemu.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not gpu and not heavy"

test-slow: install $(BENCH_STAMP)
	$(PY) -m pytest -q -m "slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

serve: install
	$(VENV)/bin/reefcap serve --host $(HOST) --port $(PORT)

# The bench-only extra (litserve, for the peer of bench-server), installed into the same venv on first use.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[$(EXTRAS),bench]'
	touch $(BENCH_STAMP)

# reefcap against a LitServe peer on the same checkpoint and images, A B A B, at 1, 8 and 32 connections
# (README "Performance"); BENCH_SERVER_ARGS=--quick smoke-tests it in under a minute.
BENCH_SERVER_ARGS ?=
bench-server: $(BENCH_STAMP)
	$(PY) -m reefcap.bench.vs $(BENCH_SERVER_ARGS)
	$(PY) -m reefcap.bench.routing $(filter --quick,$(BENCH_SERVER_ARGS))

# The server against the naive transformers pipeline (one image at a time) and the per-stage CPU costs.
bench-server-naive: install
	$(PY) -m reefcap.bench.server

# Engines vs the naive transformers pipeline, one run per model; the table goes to $(BENCH_OUT). The bundled
# tiny model is used when present, else a fresh `tiny`; blip-base-shape gets fewer batch sizes (~2 s per image).
BENCH_OUT ?= docs/benchmarks-cpu.md
BENCH_TINY ?= $(or $(firstword $(notdir $(wildcard models/zoo/*tiny*))),tiny)
BENCH_HEADER ?= \# reefcap CPU benchmarks\n\nWritten by make bench (reefcap bench); see README, ONNX and benchmarks.
bench: install
	$(VENV)/bin/reefcap bench --model $(BENCH_TINY) --batch-sizes 1,2,4,8,16,32,64 --budget 6 --repeats 5 \
		--out $(BENCH_OUT) --header '$(BENCH_HEADER)'
	$(VENV)/bin/reefcap bench --model blip-base-shape --batch-sizes 1,4,16 --budget 20 --repeats 3 \
		--naive-images 3 --out $(BENCH_OUT) --append

# GPU check (README "GPU check"). gpu-wheels fetches, for the GPU machine's Python 3.12, the pinned wheels of
# scripts/gpu-wheels.txt into .whl/ and drops any other version found there; gpu-check runs there (no venv,
# its python3 has CUDA torch); gpu-check-dry is the same path on this CPU in seconds.
GPU_OUT ?= out/gpu-check
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl -r scripts/gpu-wheels.txt
	@keep=$$(sed -n 's/^\([A-Za-z0-9_.-]*\)==\([^ ]*\).*/\1-\2/p' scripts/gpu-wheels.txt | tr 'A-Z.-' 'a-z__'); \
	for f in .whl/*.whl; do \
		key=$$(basename "$$f" | cut -d- -f1,2 | tr 'A-Z.-' 'a-z__'); \
		echo "$$keep" | grep -qx "$$key" || { echo "removing $$f (not pinned)"; rm -f "$$f"; }; \
	done
	@ls .whl; du -ch .whl/*.whl | tail -1

gpu-check:
	bash scripts/gpu_check.sh $(GPU_OUT)

gpu-check-dry: install
	PYTHON=$(PY) bash scripts/gpu_check.sh --dry-run $(GPU_OUT)-dry

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
