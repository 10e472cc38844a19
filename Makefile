# Quick start: `make run` (set up, then run the main job on the embedded default model) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast lint clean peer fuzz

# The venv reuses a torch the system Python already has (CUDA or not); otherwise it installs the
# pinned CPU wheel, because an unpinned torch pulls several GB of CUDA packages.
$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/qwen3lab verify
	$(VENV)/bin/qwen3lab generate "Hello, this is a test input" --max-steps 16

# llama.cpp as a same-run peer (`bench generate/serve --peer llama.cpp`) and verify candidate
# (`verify --candidate llama.cpp:F.gguf`): built once from the llama-cpp-python sdist into ~/.cache/qwen3lab/peers
# (about 10-15 minutes on 2 cores), with the llama-cpp-python bindings on top. Never run by `make test`.
peer: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[peer]"
	PYTHON=$(PY) benchmarks/peers/build_llama_cpp.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

# The unit tier for the inner loop (under 30 s): no slow, hf, kernels, cuda or browser tests (CONTRIBUTING.md).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not hf and not kernels and not cuda and not browser"

# The fuzz tests (tests/test_fuzz_*.py) with 20x their default Hypothesis examples and fresh random seeds: for a
# nightly run (about 10 minutes); `make test` runs them at 1x, derandomised.
FUZZ_SCALE ?= 20
fuzz: $(STAMP)
	QWEN3LAB_FUZZ_EXAMPLES=$(FUZZ_SCALE) $(PY) -m pytest -q tests/test_fuzz_*.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
