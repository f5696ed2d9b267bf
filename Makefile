# make demo | make test | make bench — each creates .venv, installs the pinned dev deps and builds
# the extension (fastdistill._C) first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py
EXT := $(VENV)/.ext-built

.PHONY: demo test test-all bench build check-package clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

# Editable install: builds fastdistill._C in place (C++ CPU kernels; CUDA too when available).
$(EXT): $(DEPS) $(EXT_SOURCES) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

build: $(EXT)

demo: $(EXT)
	$(PY) -m fastdistill demo

# The default run skips tests marked slow (CI stays under 25 minutes); test-all runs them too.
test: $(EXT)
	$(PY) -m pytest -q -m "not slow" tests

test-all: $(EXT)
	$(PY) -m pytest -q tests

# sdist -> wheel built from the sdist -> fresh venv -> smoke test (tests/package_check.py; CI runs it).
check-package: $(DEPS)
	$(PY) tests/package_check.py

# One table: every op and provider (fastdistill backends, eager, torch.compile, peers) at small shapes on CPU.
# BENCH_ARGS adds options, e.g. make bench BENCH_ARGS="--op int8_linear --json run.json --chart charts".
# The per-op scripts (benchmarks/bench_<op>.py) keep writing the CSVs under benchmarks/results.
bench: $(EXT)
	$(PY) -m fastdistill bench --device cpu --shapes small $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastdistill/_C*.so $(EXT)
