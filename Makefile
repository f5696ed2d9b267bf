# make demo | make test | make bench — each creates .venv, installs the pinned dev deps and builds
# the extension (fastdistill._C) first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py
EXT := $(VENV)/.ext-built

.PHONY: demo test test-all bench bench-check build check-package clean

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

# The pytest-benchmark suite over every op and provider (fastdistill backends, eager, torch.compile, peers) at
# small shapes on CPU; it ends with one table of ratios. BENCH_ARGS adds options, e.g.
# make bench BENCH_ARGS="--bench-op int8_linear --bench-json run.json --benchmark-json pb.json".
# `fastdistill bench` (works from a wheel) measures the same cases; the per-op scripts (benchmarks/bench_<op>.py)
# keep writing the CSVs under benchmarks/results.
bench: $(EXT)
	$(PY) -m pytest -q -p no:cacheprovider benchmarks/suite --bench-device cpu --bench-shapes small $(BENCH_ARGS)

# The ratio regression guard (README: Contributing): measures what the committed baseline measured and fails
# where a fastdistill ratio fell by more than the margin. Not part of `make test`.
bench-check: $(EXT)
	$(PY) -m fastdistill bench --check benchmarks/results/bench_cpu_small.json $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info fastdistill/_C*.so $(EXT)
