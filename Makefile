# irno: the two commands of the README are `make test` and `make demo`; both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# a CPU build of torch (fast to install); a torch already importable by $(PYTHON) is reused instead
TORCH_SPEC ?= torch==2.13.0
BUILD_DEPS := setuptools wheel numpy pybind11 ninja "cmake>=4"
TEST_DEPS  := pytest hypothesis ruff neuraloperator triton
PYTEST_ARGS ?=

.PHONY: all venv build test demo showcase lint bench clean

all: test

$(VENV)/.installed: setup.py pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "irno: reusing the torch that $(PYTHON) imports"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	$(PIP) install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q $(BUILD_DEPS) $(TEST_DEPS)
	$(PIP) install -q --no-build-isolation -e .
	@touch $@

venv: $(VENV)/.installed

# incremental rebuild of irno_kernels/_C after a change in csrc/ (serialised: one build at a time)
build: venv
	@mkdir -p build
	flock build/.lock $(PIP) install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the main job on built-in data; the report lands in runs/demo/report.md
demo: build
	$(PY) -m irno demo --config configs/demo.yaml

# a short tour of the compiled ops (reference vs fastest backend)
showcase: build
	$(PY) -m irno.showcase

lint: venv
	$(PY) -m ruff check irno_kernels python tests benchmarks setup.py

bench: build
	$(PY) benchmarks/bench_ops.py --device cpu

clean:
	rm -rf build $(VENV) irno_kernels/_C*.so *.egg-info
