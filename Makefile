# varshift: the two commands the README promises, on a fresh clone.
#   make demo   create .venv and run the whole path on a shipped sample model
#   make test   create the venvs, run ruff and mypy on varshift/ and the whole test suite
#               (what CI runs)

PY        ?= python3
VENV      ?= .venv
ARCH_VENV ?= .venv-arch
LINT_VENV ?= .venv-lint
OUT       ?= out
PIP_FLAGS ?= -q --disable-pip-version-check

# The CPU build of torch that lies on this machine's disk (a bare `torch` may pull CUDA).
TORCH     ?= torch==2.13.0
# torchvision / timm for the real-architecture tests, by machine (these pairs are on disk).
ifeq ($(shell uname -m),aarch64)
ARCH_TORCH ?= torch==2.9.1 torchvision==0.24.1
else
ARCH_TORCH ?= torch==2.14.1 torchvision==0.29.1
endif
TIMM      ?= timm==1.0.31

.PHONY: demo test lint test-core test-arch bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) $(TORCH)
	$(VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e '.[test]'
	touch $@

$(ARCH_VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(ARCH_VENV)
	$(ARCH_VENV)/bin/pip install $(PIP_FLAGS) $(ARCH_TORCH) $(TIMM)
	$(ARCH_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e '.[test,lightning]'
	# Hugging Face models for the calling-convention tests (config-built, no weights)
	$(ARCH_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt transformers
	touch $@

# ruff and mypy only (no torch): fast, and mypy checks varshift's own types (pyproject.toml).
$(LINT_VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt ruff mypy
	touch $@

demo: $(VENV)/.installed
	VENV=$(VENV) OUT=$(OUT) bash scripts/demo.sh

test: lint test-core test-arch

lint: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/ruff check varshift
	$(LINT_VENV)/bin/mypy

test-core: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "not arch"

test-arch: $(ARCH_VENV)/.installed
	$(ARCH_VENV)/bin/python -m pytest -q -m arch

# fvcore (PreciseBN) is only for the comparison; without it (offline) those rows are skipped.
bench: $(ARCH_VENV)/.installed
	-$(ARCH_VENV)/bin/pip install $(PIP_FLAGS) fvcore
	$(ARCH_VENV)/bin/python bench/run.py

clean:
	rm -rf $(VENV) $(ARCH_VENV) $(LINT_VENV) $(OUT) .pytest_cache
