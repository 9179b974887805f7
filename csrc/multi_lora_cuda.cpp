// The `cuda` backend: torch glue for the CUDA kernels in multi_lora_cuda_kernel.cu.
// Built only when setup.py builds CUDA (it then defines DLP_LORA_WITH_CUDA and compiles this file).
//
// Checks layout (shapes, dtypes, devices, contiguity) like the CPU kernel. Values (seg_indptr order,
// id range) are validated by dlp_lora.ops before the call: reading them here would cost a device sync
// on every Linear. The kernels still never dereference an id outside [0, N) (they skip it).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "multi_lora_checks.h"
#include "multi_lora_cuda_kernel.h"

namespace dlp_lora::cuda {
namespace {

ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK(false, "multi_lora: unsupported dtype ", dtype);
  }
}

void multi_lora_cuda(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                     const at::Tensor& seg_indptr, const at::Tensor& lora_ids, const at::Tensor& lora_weights) {
  check_multi_lora_layout(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights, c10::DeviceType::CUDA);
  for (const at::Tensor* t : {&y, &lora_a, &lora_b, &seg_indptr, &lora_ids, &lora_weights}) {
    TORCH_CHECK(t->device() == x.device(), "multi_lora: all tensors must be on x's device ", x.device(), ", got ",
                t->device());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  MultiLoRAArgs args{y.data_ptr(),
                     x.const_data_ptr(),
                     lora_a.const_data_ptr(),
                     lora_b.const_data_ptr(),
                     seg_indptr.const_data_ptr<int32_t>(),
                     lora_ids.const_data_ptr<int32_t>(),
                     lora_weights.const_data_ptr<float>(),
                     x.size(0), x.size(1), lora_b.size(1), lora_a.size(0), lora_a.size(1),
                     lora_ids.size(0), lora_ids.size(1)};
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_floats(args))}, x.options().dtype(at::kFloat));
  const cudaError_t err = launch_multi_lora(element_type(x.scalar_type()), args, workspace.data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "multi_lora (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace dlp_lora::cuda

TORCH_LIBRARY_IMPL(dlp_lora, CUDA, m) { m.impl("multi_lora", &dlp_lora::cuda::multi_lora_cuda); }
