// Schema of the compiled op and the Python module dlp_lora._C.
// Kernels register their implementations in their own files (CPU: multi_lora_cpu.cpp,
// CUDA: multi_lora_cuda.cpp) with TORCH_LIBRARY_IMPL, as pytorch/extension-cpp does.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(dlp_lora_C, m) {
  // y += sum_k w[s,k] * B[id] (A[id] x) for the rows of every segment; see dlp_lora/ops/__init__.py.
  m.def(
      "multi_lora(Tensor(a!) y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor seg_indptr, "
      "Tensor lora_ids, Tensor lora_weights) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dlp-lora compiled kernels (ops live in torch.ops.dlp_lora_C)";
  m.def("with_cuda", []() {
#ifdef DLP_LORA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
