# The README's two commands: `make demo` and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-timing lint clean venv

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

clean:
	rm -rf $(VENV) build *.egg-info
