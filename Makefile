# Two commands matter: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION := 2.13.0
# The model zoo's libraries (benchmarks/zoo.py, tests/test_zoo.py), without their dependencies:
# torchvision's PyPI wheel is a CUDA build that would replace the CPU torch, so it goes to a
# folder of its own that only the zoo puts on sys.path (transformers breaks on it in the venv).
TORCHVISION_VERSION := 0.28.0
TIMM_VERSION := 1.0.31
ZOO_SITE := $(VENV)/zoo-site
STAMP := $(VENV)/.tbn-setup-stamp
APT_PACKAGES := gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm

.PHONY: setup toolchain cuda-runtime demo test fuzz lint bench clean

setup: $(STAMP) toolchain cuda-runtime

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[tvm,dev]'
	$(PIP) install -q --no-deps timm==$(TIMM_VERSION)
	$(PIP) install -q --no-deps --upgrade --target $(ZOO_SITE) torchvision==$(TORCHVISION_VERSION)
	touch $(STAMP)

# Cortex-M toolchain and emulator (Debian packages); installed only as root, skipped otherwise.
toolchain:
	@if command -v arm-none-eabi-gcc >/dev/null && command -v qemu-system-arm >/dev/null; then \
		true; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null) \
		|| echo "warning: could not install $(APT_PACKAGES); Cortex-M parts will be skipped"; \
	else \
		echo "note: $(APT_PACKAGES) missing and not root; Cortex-M parts will be skipped"; \
	fi

# TVM's CUDA runtime (libtvm_runtime_cuda.so) into the venv's tvm/lib, built from TVM's sources
# ($$TVM_SOURCE_DIR or ../shared/third_party/tvm-cuda-runtime) when nvcc is found; a no-op when
# up to date; one note line and nothing built without nvcc or sources.
cuda-runtime: $(STAMP)
	@$(PY) tbn_compiler/backends/cuda_runtime.py

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q

# The differential fuzzer alone: N random nets from seed SEED (`make test` runs seeds 0-59),
# every 10th also on mps2-an386 in QEMU. A failure prints `make fuzz N=1 SEED=<seed>`.
N ?= 1000
SEED ?= 0
fuzz: setup
	FUZZ_N=$(N) FUZZ_SEED=$(SEED) $(PY) -m pytest -q tests/test_fuzz.py -k fuzz_net

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
