#!/usr/bin/env bash
# Rehearse benchmarks/gpu_check.sh's build and tests on this CPU machine, against the versions of
# the GPU image the project targets (Python 3.12, torch 2.11.0+cu130, Triton 3.6.0,
# transformers 5.17.0), so that a GPU's few minutes are not spent on version breaks.
#
#   make check-device-env      # or: bash benchmarks/device_env_check.sh
#
# First run: about 3 GB of CUDA wheels into .venv-device/ (a few minutes from the package index);
# then the extension build with the CUDA kernel (nvcc, ~1 min on 2 cores) and the CPU test suite
# (Triton under TRITON_INTERPRET=1, ~7 min). Nothing here needs a GPU.
#
# numpy < 2.4: Triton 3.6's interpreter calls int() on 1-element arrays, which numpy 2.4 refuses
# ("only 0-dimensional arrays can be converted to Python scalars"; seen with 2.4.6, not 2.3.5);
# Triton 3.9's interpreter squeezes first. The GPU image has numpy 2.5.2, which is fine there:
# compiled Triton does not use the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${DEVICE_VENV:-.venv-device}
PINS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 safetensors==0.8.0 "numpy<2.4")

if [[ ! -x "$VENV/bin/python" ]]; then
    PY312=""
    # pyenv's shims exist for versions that are installed but not selected, and then fail: run each.
    for candidate in "${PY312_BIN:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
        if [[ -n "$candidate" ]] && "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
            PY312=$candidate
            break
        fi
    done
    [[ -n "$PY312" ]] || { echo "device_env_check: no working python3.12 (set PY312_BIN)" >&2; exit 2; }
    "$PY312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# Every run, so that a changed pin applies to an existing venv (a no-op when all are satisfied).
"$VENV/bin/python" -m pip install -q "${PINS[@]}" peft tokenizers tqdm pytest pytest-benchmark \
    hypothesis ninja pybind11 setuptools wheel matplotlib
"$VENV/bin/python" - <<'PY'
import numpy, peft, torch, transformers, triton
print("device-env:", "torch", torch.__version__, "| triton", triton.__version__, "| transformers",
      transformers.__version__, "| peft", peft.__version__, "| numpy", numpy.__version__)
PY

# The build step of gpu_check.sh, with the CUDA kernel required (nvcc compiles it; it cannot run).
source benchmarks/cuda_home.sh
echo "device-env: CUDA_HOME=${CUDA_HOME:-unset}"
DLP_LORA_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import dlp_lora._C as C; print('device-env: extension', C.__file__)"

# The CPU test suite on those versions (the GPU-only tests skip).
OMP_WAIT_POLICY=PASSIVE TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
