# The README's two commands: `make demo` and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-timing lint clean venv gpu-wheels

venv: $(STAMP)

# aihwkit goes in with --no-deps: its declared dependencies pull a torchvision that fails to
# import beside the CPU torch and breaks transformers' model imports. Its real run-time needs
# are pinned in requirements.txt.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==25.3 setuptools==84.2.1
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps aihwkit==1.1.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@! $(PY) -m pip show torchvision >/dev/null 2>&1 || (echo "torchvision must not be installed" && exit 1)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hetmap demo

# Two workers (the machines have 2 cores; each worker computes on one thread), then the
# tests that send signals at chosen moments, alone (another worker's load would move them).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not serial" tests
	$(PY) -m pytest -q -m serial tests

# the quick loop while developing: everything but the tests marked slow (CI runs them all)
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

# the wall-clock assertions (noisy on shared machines, so not in the default run)
test-timing: $(STAMP)
	$(PY) -m pytest -q -m timing --timing tests

# wheels the GPU device machine lacks (Python 3.12), carried there by benchmarks/gpu_run.sh
gpu-wheels:
	mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
	    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	    aihwkit==1.1.0 transformers==5.24.0

clean:
	rm -rf $(VENV) build *.egg-info
