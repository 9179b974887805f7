// CUDA kernels of the multi-LoRA op, for GPUs where the Triton backend is unavailable.
//
//   y[t] += sum_k w[s,k] * B[id] (A[id] x[t])      for t in segment s, id = lora_ids[s,k] in [0, N)
//
// Two launches, both with fp32 accumulation:
//  1. shrink: one block per token. The token's x row is staged in shared memory as fp32; each warp
//     takes rows (k, j) of the mixture's stacked A and writes u[t, k*r + j] = w[s,k] * <A[id][j], x[t]>.
//  2. expand: grid (token, block of 256 output features); each thread owns one y element:
//     y[t,o] = T(float(y[t,o]) + sum_{k,j} B[id][o][j] * u[t, k*r + j])   (one rounding, as the
//     reference does). A thread reads its B row's r contiguous elements; a warp's 32 rows are contiguous.
// Decode (one token per segment) is one block per token in both launches; prefill re-reads a
// segment's adapters per token from L2 (they are small: K*r*(d_in+d_out) elements).
//
// No torch headers here (see multi_lora_cuda_kernel.h). Values are not trusted: an id outside [0, N)
// contributes nothing and is never dereferenced; a token outside every segment is not written.
#include "multi_lora_cuda_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace dlp_lora::cuda {
namespace {

constexpr int kShrinkThreads = 128;  // 4 warps per token
constexpr int kExpandThreads = 256;  // output features per block
constexpr int64_t kMaxStagedDin = 12 * 1024;  // x row staged in shared memory up to 48 KiB of fp32

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The segment s with seg_indptr[s] <= t < seg_indptr[s+1], or -1. Empty segments (equal bounds) are
// skipped by the search; a malformed (decreasing) seg_indptr can only yield some s in [0, S) or -1.
__device__ __forceinline__ int64_t find_segment(const int32_t* seg_indptr, int64_t S, int64_t t) {
  if (S <= 0 || t < seg_indptr[0] || t >= seg_indptr[S]) return -1;
  int64_t lo = 0, hi = S;  // invariant: seg_indptr[lo] <= t < seg_indptr[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (seg_indptr[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__device__ __forceinline__ bool valid_id(int32_t id, int64_t N) { return id >= 0 && id < N; }

// u[t, k*r + j] = w[s,k] * dot(A[id_k][j], x[t]); zero for empty slots and tokens outside segments.
template <typename T, bool kStageX>
__global__ void __launch_bounds__(kShrinkThreads)
    shrink_kernel(const T* __restrict__ x, const T* __restrict__ lora_a, const int32_t* __restrict__ seg_indptr,
                  const int32_t* __restrict__ lora_ids, const float* __restrict__ lora_weights,
                  float* __restrict__ u, int64_t d_in, int64_t N, int64_t r, int64_t S, int64_t K) {
  extern __shared__ float x_staged[];  // [d_in] when kStageX
  const int64_t t = blockIdx.x;
  const int64_t s = find_segment(seg_indptr, S, t);
  const T* x_row = x + t * d_in;
  if constexpr (kStageX) {
    for (int64_t i = threadIdx.x; i < d_in; i += blockDim.x) x_staged[i] = to_float(x_row[i]);
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  const int64_t rows = K * r;
  for (int64_t q = warp; q < rows; q += n_warps) {
    const int64_t k = q / r, j = q % r;
    const int32_t id = s >= 0 ? lora_ids[s * K + k] : -1;
    float acc = 0.f;
    if (valid_id(id, N)) {  // warp-uniform branch
      const T* a_row = lora_a + (static_cast<int64_t>(id) * r + j) * d_in;
      for (int64_t i = lane; i < d_in; i += 32) {
        acc = fmaf(to_float(a_row[i]), kStageX ? x_staged[i] : to_float(x_row[i]), acc);
      }
      acc = warp_sum(acc) * lora_weights[s * K + k];
    }
    if (lane == 0) u[t * rows + q] = acc;
  }
}

// y[t, o] = round(float(y[t, o]) + sum_{k,j} B[id_k][o][j] * u[t, k*r + j]) for one (t, o) per thread.
template <typename T>
__global__ void __launch_bounds__(kExpandThreads)
    expand_kernel(T* __restrict__ y, const T* __restrict__ lora_b, const int32_t* __restrict__ seg_indptr,
                  const int32_t* __restrict__ lora_ids, const float* __restrict__ u, int64_t d_out, int64_t N,
                  int64_t r, int64_t S, int64_t K) {
  const int64_t t = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  const int64_t s = find_segment(seg_indptr, S, t);
  if (s < 0 || o >= d_out) return;
  const float* u_row = u + t * K * r;
  float acc = 0.f;
  bool any = false;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t id = lora_ids[s * K + k];
    if (!valid_id(id, N)) continue;
    any = true;
    const T* b_row = lora_b + (static_cast<int64_t>(id) * d_out + o) * r;
    const float* u_k = u_row + k * r;
    for (int64_t j = 0; j < r; ++j) acc = fmaf(to_float(b_row[j]), u_k[j], acc);
  }
  // A segment whose slots are all empty leaves y bit-identical (no round trip through fp32).
  if (any) y[t * d_out + o] = from_float<T>(to_float(y[t * d_out + o]) + acc);
}

template <typename T>
cudaError_t launch(const MultiLoRAArgs& p, float* workspace, cudaStream_t stream) {
  if (p.T == 0 || p.S == 0 || p.K == 0 || p.r == 0 || p.d_out == 0) return cudaSuccess;
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.lora_a);
  const T* b = static_cast<const T*>(p.lora_b);
  T* y = static_cast<T*>(p.y);
  const dim3 shrink_grid(static_cast<unsigned>(p.T));
  if (p.d_in <= kMaxStagedDin) {
    const size_t smem = static_cast<size_t>(p.d_in) * sizeof(float);
    shrink_kernel<T, true><<<shrink_grid, kShrinkThreads, smem, stream>>>(
        x, a, p.seg_indptr, p.lora_ids, p.lora_weights, workspace, p.d_in, p.N, p.r, p.S, p.K);
  } else {
    shrink_kernel<T, false><<<shrink_grid, kShrinkThreads, 0, stream>>>(
        x, a, p.seg_indptr, p.lora_ids, p.lora_weights, workspace, p.d_in, p.N, p.r, p.S, p.K);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 expand_grid(static_cast<unsigned>(p.T), static_cast<unsigned>((p.d_out + kExpandThreads - 1) / kExpandThreads));
  expand_kernel<T><<<expand_grid, kExpandThreads, 0, stream>>>(y, b, p.seg_indptr, p.lora_ids, workspace, p.d_out,
                                                               p.N, p.r, p.S, p.K);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_multi_lora(ElementType dtype, const MultiLoRAArgs& args, float* workspace, cudaStream_t stream) {
  // Grid limits: T blocks on x (2^31-1), d_out/256 blocks on y (65535).
  if (args.T > 0x7fffffffLL || (args.d_out + kExpandThreads - 1) / kExpandThreads > 65535) {
    return cudaErrorInvalidConfiguration;
  }
  switch (dtype) {
    case ElementType::kFloat32: return launch<float>(args, workspace, stream);
    case ElementType::kFloat16: return launch<__half>(args, workspace, stream);
    case ElementType::kBFloat16: return launch<__nv_bfloat16>(args, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dlp_lora::cuda
