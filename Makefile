# The two commands of the README: `make test` and `make bench`. Both set up the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export OMP_NUM_THREADS ?= $(shell nproc)

.PHONY: setup test test-python test-cpp bench lint clean

setup:
	bash scripts/setup.sh

# Full suite: Python tests (Triton kernels under the interpreter: no GPU here) and the C++ tests.
test: setup lint test-cpp test-python

test-python:
	TRITON_INTERPRET=1 $(PY) -m pytest tests/ -q

test-cpp:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	cmake --build build -j 2
	ctest --test-dir build --output-on-failure

bench: setup
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks/ --benchmark-only -q -p no:randomly \
		--benchmark-json=benchmarks/results/latest.json
	$(PY) -m benchmarks.report benchmarks/results/latest.json

lint:
	$(VENV)/bin/ruff check htc_kernels htc_model tests benchmarks
	$(VENV)/bin/ruff format --check htc_kernels htc_model tests benchmarks

clean:
	rm -rf build htc_kernels/_C*.so
