// Host interface of the CUDA multi-LoRA kernels (multi_lora_cuda_kernel.cu). Torch-free on purpose:
// `make check-cuda` compile-checks the .cu with plain nvcc on machines whose torch has no CUDA, and the
// torch glue (multi_lora_cuda.cpp, built only with a CUDA torch) passes raw pointers through here.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace dlp_lora::cuda {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

// One call of the op. All pointers are device pointers to contiguous tensors (see the op contract):
//   y [T, d_out], x [T, d_in], lora_a [N, r, d_in], lora_b [N, d_out, r]   (element type `dtype`)
//   seg_indptr [S+1] int32, lora_ids [S, K] int32 (-1 = empty slot), lora_weights [S, K] float32
struct MultiLoRAArgs {
  void* y;
  const void* x;
  const void* lora_a;
  const void* lora_b;
  const int32_t* seg_indptr;
  const int32_t* lora_ids;
  const float* lora_weights;
  int64_t T, d_in, d_out, N, r, S, K;
};

// fp32 scratch the launcher needs: the shrunk activations u [T, K*r].
inline size_t workspace_floats(const MultiLoRAArgs& a) { return static_cast<size_t>(a.T * a.K * a.r); }

// Enqueue  y += sum_k w[s,k] * B[id] (A[id] x)  on `stream` (two kernels: shrink, then expand).
// `workspace` holds workspace_floats(args) floats. Ids outside [0, N) are skipped, never read, and a
// token outside every segment is left untouched; the caller validates values beforehand (reading
// them here would need a device sync). Returns the launch error, if any.
cudaError_t launch_multi_lora(ElementType dtype, const MultiLoRAArgs& args, float* workspace, cudaStream_t stream);

}  // namespace dlp_lora::cuda
