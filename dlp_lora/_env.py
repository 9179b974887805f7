"""Every environment variable dlp-lora reads, in one place.

Build time (setup.py):
  DLP_LORA_SKIP_EXT=1     build no compiled extension
  DLP_LORA_CUDA=0/1       never / always build the CUDA kernel (default: when torch has CUDA and nvcc exists)
  DLP_LORA_NATIVE=1       compile the CPU kernel with -march=native

Run time:
  DLP_LORA_BACKEND        force a backend for every call: reference | cpp | triton | cuda
  DLP_LORA_CPU_ISA        step the C++ CPU kernel down: avx512 | avx2 | generic (default: best the CPU has)
  TRITON_INTERPRET=1      run Triton kernels on CPU tensors (tests); must be set before import
  DLP_LORA_DEMO_DIR       artifact cache of `python -m dlp_lora.demo` (default: .cache/dlp_demo)
  DLP_LORA_API_KEY        `dlp-lora serve`'s API key when --api-key is not given (clients send
                          `Authorization: Bearer <key>`); a key in the environment stays out of `ps`
  DLP_LORA_REAL_MODEL_DIR cache of the real-model lab (`python -m dlp_lora.realmodel`): the converted
                          model and every artifact of its experiment (default: ~/.cache/dlp-lora/real-model)
"""

import os

BACKEND_ENV = "DLP_LORA_BACKEND"
DEMO_DIR_ENV = "DLP_LORA_DEMO_DIR"
API_KEY_ENV = "DLP_LORA_API_KEY"
REAL_MODEL_DIR_ENV = "DLP_LORA_REAL_MODEL_DIR"


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def forced_backend() -> str | None:
    value = os.environ.get(BACKEND_ENV, "").strip().lower()
    return value or None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
