# mmae: `make demo` and `make test` work on a fresh clone (they create .venv and install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install interop-env wheel-check demo test test-all bench clean

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

# timm (the export interop test) imports torchvision, whose PyPI wheels pin a CUDA build of
# torch: it gets an environment of its own (~5.5 GB, about a minute), never mixed with the
# project's CPU torch. The test runs timm there in a fresh interpreter that cannot import mmae.
TIMM_VENV ?= .venv-timm
TIMM_STAMP := $(TIMM_VENV)/.installed
$(TIMM_STAMP):
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install -q timm safetensors
	touch $(TIMM_STAMP)

interop-env: $(TIMM_STAMP)

# The package as users get it: a wheel in a clean environment, run from an empty folder.
WHEEL_CHECK ?= build/wheel-check
wheel-check: install
	rm -rf $(WHEEL_CHECK) && mkdir -p $(WHEEL_CHECK)/dist $(WHEEL_CHECK)/empty
	$(PY) -m pip wheel -q --no-deps -w $(WHEEL_CHECK)/dist .
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/python -m pip install -q torch==2.13.0
	$(WHEEL_CHECK)/venv/bin/python -m pip install -q $(WHEEL_CHECK)/dist/mmae-*.whl
	cd $(WHEEL_CHECK)/empty && ../venv/bin/mmae --version && ../venv/bin/mmae config m3ae > m3ae.yaml \
		&& ../venv/bin/mmae demo --out demo --pairs 60 --train-steps 2 > demo.log \
		&& test -f demo/run/checkpoints/last && echo "wheel-check: OK"

demo: install
	$(VENV)/bin/mmae demo --out build/demo

test: install $(TIMM_STAMP)
	MMAE_TIMM_PYTHON=$(abspath $(TIMM_VENV))/bin/python $(PY) -m pytest

test-all: install $(TIMM_STAMP)
	MMAE_TIMM_PYTHON=$(abspath $(TIMM_VENV))/bin/python $(PY) -m pytest -m ''

bench: install
	$(PY) benchmarks/build_throughput.py

clean:
	rm -rf build .pytest_cache
