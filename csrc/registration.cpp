// Schema of the compiled op and the Python module dlp_lora._C.
// Kernels register their implementations in their own files (CPU: multi_lora_cpu.cpp,
// CUDA: multi_lora_cuda.cpp) with TORCH_LIBRARY_IMPL, as pytorch/extension-cpp does.
#include <torch/extension.h>
#include <torch/library.h>

#include "multi_lora_cpu.h"
#include "multi_lora_cpu_simd.h"

TORCH_LIBRARY(dlp_lora, m) {
  // The fake (meta) impl for torch.compile lives in Python; this names the module in torch's errors.
  m.set_python_module("dlp_lora.ops._fake");
  // y += sum_k w[s,k] * B[id] (A[id] x) for the rows of every segment; see dlp_lora/ops/__init__.py.
  m.def(
      "multi_lora(Tensor(a!) y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor seg_indptr, "
      "Tensor lora_ids, Tensor lora_weights) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlp-lora compiled kernels (ops live in torch.ops.dlp_lora)";
  m.def("with_cuda", []() {
#ifdef DLP_LORA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // Knobs of the CPU kernel, for tests (cover every path on one machine) and benchmarks.
  m.def("cpu_isa", []() { return std::string(dlp_lora::cpu::active_isa()); },
        "Instruction set of the CPU kernel's vector loops: 'avx512', 'avx2' or 'generic'.");
  m.def("set_cpu_isa", [](const std::string& name) { return dlp_lora::cpu::set_isa(name.c_str()); },
        "Force 'avx512', 'avx2', 'generic' or 'auto'; False (no change) if this CPU lacks it.");
  m.def("set_gemm_min_rows", &dlp_lora::cpu::set_gemm_min_rows,
        "Segments of at least this many rows use gather+GEMM on CPU; <= 0 restores the default. "
        "Returns the previous value (0 = default).");
  m.def("gemm_min_rows", &dlp_lora::cpu::gemm_min_rows, "Threshold in effect for a dtype name.");
}
