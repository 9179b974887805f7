#!/usr/bin/env bash
# One-shot GPU check for a bare H100/H200 (torch + CUDA + Triton preinstalled, no network).
#
#   bash benchmarks/gpu_check.sh            # from the repository root (or anywhere: it cd's there)
#
# Steps (each under its own `timeout`; a failed step is reported and the next one still runs):
#   1. build   pip install --no-build-isolation --no-deps -e . with the CUDA kernel (DLP_LORA_CUDA=1)
#   2. tests   pytest tests/test_ops_gpu.py tests/test_ops_reference.py (triton + cuda vs float64 oracle)
#              and the patched model's generate() under CUDA graphs (tests/test_compile.py)
#              and the decode-step breakdown on the GPU (tests/test_bench.py)
#   3. e2e     dlp-lora bench --device cuda: ~1.1B Llama in bf16, eager, batch 1 and 8, N 26 and 100,
#              with LoRA-Flow (--loraflow: loraflow_{loop,op}_k{3,N}_N, a gate per layer, token-level
#              weights; the K = N loop form launches ~5 kernels per adapter and module per step)
#              -> benchmarks/results/e2e_<gpu>.json (the GPU goals: <= 1.15x / 1.2x base);
#              the file is saved after each batch size, so a step stopped by its limit keeps batch 1
#              (marked "complete": false)
#   4. e2e-compile  the same model, batch 1, with generate()'s automatic torch.compile
#              (reduce-overhead = CUDA graphs): base, DLP-LoRA N=26/100, MeteoRA op form
#              -> benchmarks/results/e2e_<gpu>_compile.json
#   5. bench   benchmarks/gpu_ops.py -> benchmarks/results/gpu_ops_<gpu>.json + a table
#   6. breakdown  dlp-lora bench --breakdown: one batch-1 decode step per variant, operator calls and
#              CPU / GPU-kernel time by category -> benchmarks/results/decode_breakdown_<gpu>.json
#              (it runs only in what is left of the budget)
#   7. serve   benchmarks/bench_serve.py --device cuda: `dlp-lora serve`'s app with 1 replica on 1 GPU,
#              max batch 1 vs 16 at 1 and 16 clients -> benchmarks/results/serve_<gpu>.json
#              (skipped when ray[serve] is not installed; last, in what is left of the budget)
# Ordered by what matters most; the steps share BUDGET_S (default 470 s; < 8 minutes with the
# probes between them): each step's limit is cut to the time left, and a step with under 15 s
# left is skipped. Logs and result files are copied to $OUT when it is set.
# Exit status: 0 when every step passed, else 1 (the summary names the failed steps).
# Environment: OUT (log/result folder), BUDGET_S, PYTHON (default python3), TORCH_CUDA_ARCH_LIST
# (default 9.0), SKIP_BUILD=1 (use the installed build; for dry runs of this script).

set -u
cd "$(dirname "$0")/.."

BUDGET_S=${BUDGET_S:-470}
START=$(date +%s)
PY=${PYTHON:-python3}
# $OUT gets the main log (every step's output) and the result files, few enough to copy back from
# a remote machine; the per-step logs stay in benchmarks/results/gpu_check_logs.
LOG_DIR=benchmarks/results/gpu_check_logs
mkdir -p "$LOG_DIR" benchmarks/results
LOG="${OUT:-$LOG_DIR}/gpu_check.log"
: > "$LOG"
FAILED=()
PASSED=()
LAST_RC=0

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD with its output in $LOG_DIR/NAME.log (and the main log),
# killed after min(LIMIT_S, time left in the budget).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if ((left < 15)); then
        say "=== [$name] SKIPPED: only ${left}s of the ${BUDGET_S}s budget left"
        FAILED+=("$name(no time)")
        LAST_RC=124
        return 0
    fi
    ((limit > left)) && limit=$left
    say "=== [$name] start (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > >(tee "$LOG_DIR/$name.log" | tee -a "$LOG") 2>&1
    local rc=$?
    LAST_RC=$rc
    sleep 0.2  # let the tee of the process substitution flush
    local took=$(($(date +%s) - t0))
    if ((rc == 0)); then
        PASSED+=("$name(${took}s)")
        say "=== [$name] ok in ${took}s"
    else
        ((rc == 124 || rc == 137)) && say "=== [$name] TIMED OUT after ${limit}s"
        FAILED+=("$name(rc=$rc,${took}s)")
        say "=== [$name] FAILED rc=$rc in ${took}s"
    fi
    return 0
}

say "=== gpu_check.sh $(date -u +%FT%TZ) in $(pwd)"
say "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, platform, shutil
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for mod in ("triton", "transformers", "peft", "pytest", "hypothesis", "ninja", "setuptools", "wheel", "pybind11"):
    try:
        print(f"  {mod:13s}", getattr(importlib.import_module(mod), "__version__", "present"))
    except Exception as exc:
        print(f"  {mod:13s} MISSING ({type(exc).__name__})")
print("  nvcc         ", shutil.which("nvcc"), "| ninja binary", shutil.which("ninja"))
EOF

# 1. Build (in place, editable) with the CUDA kernel for Hopper. No network: never ask an index.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
source benchmarks/cuda_home.sh
say "CUDA_HOME=${CUDA_HOME:-unset} | $(nvcc --version 2>&1 | tail -1)"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ -n "${SKIP_BUILD:-}" ]]; then
    say "=== [build] skipped (SKIP_BUILD set)"
else
    step build 240 env DLP_LORA_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e .
    if ((LAST_RC != 0)); then
        # Still install the Python package (and its dlp_lora.triton_kernels mapping) so that the
        # triton backend is tested; the cuda tests will then skip, naming the missing extension.
        step build-python-only 90 env DLP_LORA_SKIP_EXT=1 $PY -m pip install --no-build-isolation --no-deps -e .
    fi
fi
$PY -c "from dlp_lora import ops; print('available backends on cuda:', ops.available_backends('cuda'))" 2>&1 \
    | tee -a "$LOG"

GPU_SLUG=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_ops; print(gpu_ops.gpu_slug())" 2>/dev/null || echo unknown_gpu)

# 2. GPU tests (+ the backend-independent oracle tests, + generate() under CUDA graphs).
step tests 150 $PY -m pytest -q -p no:cacheprovider -rs --durations=10 \
    tests/test_ops_gpu.py tests/test_ops_reference.py tests/test_compile.py::test_generate_cuda_graphs_match_eager \
    tests/test_bench.py::test_decode_breakdown_on_gpu_counts_kernels

BENCH=($PY -m dlp_lora.cli bench --device cuda --new-tokens 32 --reps 3)

# 3. End-to-end decode, eager: every variant (LoRA-Flow included), batch 1 and 8, N = 26 and 100.
step e2e 240 "${BENCH[@]}" --adapters 26 100 --forms bmm op --loraflow \
    --out "benchmarks/results/e2e_${GPU_SLUG}.json"

# 4. End-to-end decode, compiled (CUDA graphs), batch 1; each variant compiles once in its warm-up.
step e2e-compile 200 "${BENCH[@]}" --compile --batch-sizes 1 --adapters 26 100 --forms op \
    --variants 'dlp_N*' meteora_op_N26 --out "benchmarks/results/e2e_${GPU_SLUG}_compile.json"

# 5. Microbenchmark: triton / cuda vs torch compositions, GB/s against the copy bandwidth.
step bench 120 $PY benchmarks/gpu_ops.py

# 6. Where an eager decode step's time goes on the GPU (launch counts); reuses step 3's adapters.
step breakdown 150 "${BENCH[@]}" --breakdown --adapters 26 100 --forms bmm op \
    --out "benchmarks/results/decode_breakdown_${GPU_SLUG}.json"

# 7. The OpenAI-compatible server on the GPU (Ray Serve, HTTP on 127.0.0.1): serial vs batched.
if $PY -c "import ray.serve, fastapi" 2>/dev/null; then
    step serve 200 $PY benchmarks/bench_serve.py --device cuda --batch-sizes 1 16 --clients 1 16 \
        --out "benchmarks/results/serve_${GPU_SLUG}.json"
else
    say "=== [serve] SKIPPED: ray[serve] is not installed (pip install 'dlp-lora[serve]')"
fi

# Results travel back through $OUT.
if [[ -n "${OUT:-}" ]]; then
    cp -v benchmarks/results/gpu_ops_"${GPU_SLUG}".json benchmarks/results/e2e_"${GPU_SLUG}"*.json \
        benchmarks/results/e2e_"${GPU_SLUG}"*.png benchmarks/results/decode_breakdown_"${GPU_SLUG}".json \
        benchmarks/results/serve_"${GPU_SLUG}".json \
        "$OUT"/ 2>/dev/null | tee -a "$LOG"
fi

say "=== summary after $(($(date +%s) - START))s: passed: ${PASSED[*]:-none}; failed: ${FAILED[*]:-none}"
((${#FAILED[@]} == 0))
