"""Build dlp_lora._C: the C++ CPU kernel always, the CUDA kernel when possible.

Environment flags (also listed in README.md and dlp_lora/_env.py):
  DLP_LORA_SKIP_EXT=1   build no extension (pure-Python install; reference/triton backends only)
  DLP_LORA_CUDA=1       require the CUDA kernel (error if torch has no CUDA or nvcc is missing)
  DLP_LORA_CUDA=0       never build the CUDA kernel
  (unset)               build it when torch has CUDA and CUDA_HOME/nvcc is found
  DLP_LORA_NATIVE=1     compile the CPU kernel with -march=native (default: off, portable wheels)
  TORCH_CUDA_ARCH_LIST  the usual torch variable, e.g. "9.0a" for H100/H200
"""

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _flag(name):
    value = os.environ.get(name)
    return None if value in (None, "") else value not in ("0", "false", "False", "no")


def _extensions():
    if _flag("DLP_LORA_SKIP_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    want_cuda = _flag("DLP_LORA_CUDA")
    # torch guesses CUDA_HOME from where `nvcc` is; an `nvcc` wrapper script in /usr/local/bin makes
    # that guess /usr/local, whose include/ has no CUDA headers, and the build then dies deep in
    # ninja on "cuda_runtime.h: No such file". Check the headers here and say what to set instead.
    cuda_headers = CUDA_HOME is not None and (Path(CUDA_HOME) / "include" / "cuda_runtime.h").exists()
    cuda_possible = torch.version.cuda is not None and cuda_headers
    if want_cuda and not cuda_possible:
        raise RuntimeError(
            "DLP_LORA_CUDA=1 but the CUDA kernel cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
            + ("" if cuda_headers or CUDA_HOME is None else " has no include/cuda_runtime.h")
            + "; set CUDA_HOME to the CUDA toolkit's root (e.g. /usr/local/cuda)"
        )
    build_cuda = cuda_possible if want_cuda is None else want_cuda
    if want_cuda is None and torch.version.cuda is not None and not cuda_possible:
        print(
            f"dlp-lora: building without the CUDA kernel: CUDA_HOME={CUDA_HOME!r} has no "
            "include/cuda_runtime.h (set CUDA_HOME to the toolkit's root to build it)"
        )

    # No -std flag: torch's BuildExtension adds the standard its own headers need (C++17 for torch
    # 2.11, C++20 for 2.13, whose headers warn under C++17). The sources build warning-free under both.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if _flag("DLP_LORA_NATIVE"):
        cxx.append("-march=native")
    sources = [str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cpp")) if p.name != "multi_lora_cuda.cpp"]
    kwargs = dict(
        name="dlp_lora._C",
        sources=sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        define_macros=[],
    )
    if build_cuda:
        kwargs["sources"] += ["csrc/multi_lora_cuda.cpp", "csrc/multi_lora_cuda_kernel.cu"]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo"]
        kwargs["define_macros"] = kwargs["define_macros"] + [("DLP_LORA_WITH_CUDA", None)]
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    # Every package under dlp_lora/ is found, so a new subpackage cannot be left out of the wheel
    # (tests/test_wheel.py installs one and imports them all). triton_kernels/ ships INSIDE the
    # package: a top-level `triton_kernels` module already exists on PyPI and in the Triton/vLLM
    # world and would clash.
    packages=find_packages(include=["dlp_lora", "dlp_lora.*"]) + ["dlp_lora.triton_kernels"],
    package_dir={"dlp_lora.triton_kernels": "triton_kernels"},
    package_data={"dlp_lora.demo": ["*.json", "base-model/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
