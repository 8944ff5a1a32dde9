# mmae: `make demo` and `make test` work on a fresh clone (they create .venv and install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: 2.13.0 is the CPU build (a local wheel on our machines); any other spec
# pulls several GB of CUDA wheels. The project's own `torch>=...` range is then already met.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/mmae demo --out build/demo

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ''

bench: install
	$(PY) benchmarks/build_throughput.py

clean:
	rm -rf build .pytest_cache
