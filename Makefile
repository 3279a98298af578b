# The two commands of the README: `make test` and `make bench`. Both set up the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export OMP_NUM_THREADS ?= $(shell nproc)

.PHONY: setup setup-vllm test test-python test-cpp test-asan native-ext bench lint clean

setup:
	bash scripts/setup.sh

# vLLM's own venv (.venv-vllm, its own torch) for tests/test_serving.py and benchmarks/test_bench_vllm.py;
# about 90 s the first time, an import check after that.
setup-vllm:
	bash scripts/setup_vllm.sh

# Full suite: Python tests (Triton kernels under the interpreter: no GPU here) and the C++ tests.
test: setup setup-vllm lint test-cpp test-python

test-python:
	TRITON_INTERPRET=1 $(PY) -m pytest tests/ -q

test-cpp:
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	cmake --build build -j 2
	ctest --test-dir build --output-on-failure

# The raw-op fuzz test and the kernel tests against an AddressSanitizer build of the CPU kernels. The
# ASan build (HTC_ASAN=1, setup.py) goes to build/asan/lib together with a copy of the Python package;
# pytest runs from there so that copy is the one imported. Python leaks by design: no leak check.
ASAN_LIB := build/asan/lib
# libstdc++ too: ASan's __cxa_throw interceptor must find it at start-up (python itself is C), or the
# first C++ exception (a TORCH_CHECK) aborts the process.
ASAN_PRELOAD = "$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)"
ASAN_TESTS := tests/test_fuzz.py tests/test_star_attention.py tests/test_mgvq_lookup.py tests/test_layout.py
test-asan: setup
	HTC_ASAN=1 HTC_NO_CUDA=1 $(PY) setup.py -q build --build-base build/asan/tmp --build-lib $(ASAN_LIB)
	cd $(ASAN_LIB) && LD_PRELOAD=$(ASAN_PRELOAD) ASAN_OPTIONS=detect_leaks=0 \
		PYTHONPATH=$(CURDIR) TRITON_INTERPRET=1 HTC_FUZZ_SECONDS=$${HTC_FUZZ_SECONDS:-10} \
		$(abspath $(PY)) -c "import htc_kernels as hk, sys; from htc_kernels import _ext; \
		assert _ext.available() and hk.__file__.startswith('$(abspath $(ASAN_LIB))'), (hk.__file__, _ext.LOAD_ERROR)"
	cd $(ASAN_LIB) && LD_PRELOAD=$(ASAN_PRELOAD) ASAN_OPTIONS=detect_leaks=0 \
		PYTHONPATH=$(CURDIR) TRITON_INTERPRET=1 HTC_FUZZ_SECONDS=$${HTC_FUZZ_SECONDS:-10} \
		$(abspath $(PY)) -m pytest -p no:cacheprovider -q $(addprefix $(CURDIR)/,$(ASAN_TESTS))

# A -march=native build of the CPU kernels (no CUDA) that make bench times the portable (dispatched)
# build against (issue 13). Objects are kept in build/native/tmp (a few minutes the first time), the
# package copy lands in build/native/lib; nothing outside build/ changes.
NATIVE_LIB := build/native/lib
native-ext: setup
	HTC_CPU_ARCH=native HTC_NO_CUDA=1 $(PY) setup.py -q build --build-base build/native/tmp --build-lib $(NATIVE_LIB)

bench: setup setup-vllm native-ext
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks/ --benchmark-only -q -p no:randomly \
		--benchmark-json=benchmarks/results/latest.json
	$(PY) -m benchmarks.report benchmarks/results/latest.json

lint:
	$(VENV)/bin/ruff check htc_kernels htc_model tests benchmarks
	$(VENV)/bin/ruff format --check htc_kernels htc_model tests benchmarks

clean:
	rm -rf build htc_kernels/_C*.so
