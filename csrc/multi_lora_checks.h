// Argument checks shared by the CPU and CUDA implementations of torch.ops.dlp_lora.multi_lora.
//
// For the `cpp` backend these are THE checks: dlp_lora.ops.multi_lora calls this op directly and turns a
// failed TORCH_CHECK into its MultiLoRAArgumentError (it adds only the grad-mode check). The CUDA op runs
// the layout checks here; its values are checked in Python (dlp_lora/ops/validate.py), since reading
// them here would cost a device sync. Every message names the argument, and nothing reaches a kernel
// that could read past a tensor.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

namespace dlp_lora {

inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim, c10::DeviceType device) {
  TORCH_CHECK(t.defined(), "multi_lora: `", name, "` is undefined");
  TORCH_CHECK(t.dim() == dim, "multi_lora: `", name, "` must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.device().type() == device, "multi_lora: `", name, "` is on ", t.device(), ", expected ",
              c10::DeviceTypeName(device));
  TORCH_CHECK(t.is_contiguous(), "multi_lora: `", name, "` must be contiguous");
}

// Shapes, dtypes, devices, contiguity. O(1): no tensor values are read.
inline void check_multi_lora_layout(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a,
                                    const at::Tensor& lora_b, const at::Tensor& seg_indptr,
                                    const at::Tensor& lora_ids, const at::Tensor& lora_weights,
                                    c10::DeviceType device) {
  check_tensor(y, "y", 2, device);
  check_tensor(x, "x", 2, device);
  check_tensor(lora_a, "lora_a", 3, device);
  check_tensor(lora_b, "lora_b", 3, device);
  check_tensor(seg_indptr, "seg_indptr", 1, device);
  check_tensor(lora_ids, "lora_ids", 2, device);
  check_tensor(lora_weights, "lora_weights", 2, device);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "multi_lora: `x` must be float32, float16 or bfloat16 for the compiled kernels, got ", dtype);
  TORCH_CHECK(y.scalar_type() == dtype, "multi_lora: `y` must have x's dtype ", dtype, ", got ", y.scalar_type());
  TORCH_CHECK(lora_a.scalar_type() == dtype, "multi_lora: `lora_a` must have x's dtype ", dtype, ", got ",
              lora_a.scalar_type());
  TORCH_CHECK(lora_b.scalar_type() == dtype, "multi_lora: `lora_b` must have x's dtype ", dtype, ", got ",
              lora_b.scalar_type());
  TORCH_CHECK(seg_indptr.scalar_type() == at::kInt, "multi_lora: `seg_indptr` must be int32, got ",
              seg_indptr.scalar_type());
  TORCH_CHECK(lora_ids.scalar_type() == at::kInt, "multi_lora: `lora_ids` must be int32, got ",
              lora_ids.scalar_type());
  TORCH_CHECK(lora_weights.scalar_type() == at::kFloat, "multi_lora: `lora_weights` must be float32, got ",
              lora_weights.scalar_type());

  const int64_t T = x.size(0), d_in = x.size(1), N = lora_a.size(0), r = lora_a.size(1);
  TORCH_CHECK(lora_a.size(2) == d_in, "multi_lora: `lora_a` has shape ", lora_a.sizes(), ", expected [N, r, d_in=",
              d_in, "]");
  TORCH_CHECK(lora_b.size(0) == N && lora_b.size(2) == r, "multi_lora: `lora_b` has shape ", lora_b.sizes(),
              ", expected [N=", N, ", d_out, r=", r, "] to match lora_a");
  const int64_t d_out = lora_b.size(1);
  TORCH_CHECK(y.size(0) == T && y.size(1) == d_out, "multi_lora: `y` has shape ", y.sizes(), ", expected [T=", T,
              ", d_out=", d_out, "]");
  TORCH_CHECK(seg_indptr.size(0) >= 1, "multi_lora: `seg_indptr` must have S+1 >= 1 entries");
  const int64_t S = seg_indptr.size(0) - 1;
  TORCH_CHECK(lora_ids.size(0) == S, "multi_lora: `lora_ids` has ", lora_ids.size(0),
              " rows but seg_indptr describes S=", S, " segments");
  TORCH_CHECK(lora_weights.sizes() == lora_ids.sizes(), "multi_lora: `lora_weights` has shape ",
              lora_weights.sizes(), ", expected lora_ids' ", lora_ids.sizes());
  TORCH_CHECK(T < (int64_t{1} << 31), "multi_lora: `x` has more than 2^31-1 rows (seg_indptr is int32)");

  // y is written while every input is read (several times, by rows and by tiles): any overlap gives a
  // silently wrong delta, so refuse it as PyTorch's out= ops do. All are contiguous, so the status is
  // exact (never TooHard); sharing a storage without overlapping bytes is fine.
  const std::pair<const at::Tensor*, const char*> inputs[] = {
      {&x, "x"}, {&lora_a, "lora_a"}, {&lora_b, "lora_b"}, {&seg_indptr, "seg_indptr"},
      {&lora_ids, "lora_ids"}, {&lora_weights, "lora_weights"}};
  for (const auto& [t, name] : inputs) {
    const auto status = at::get_overlap_status(y, *t);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                "multi_lora: `y` overlaps `", name, "` in memory; y is written in place while the inputs are "
                "read, so it must not share memory with any of them (pass a separate y, or clone ", name, ")");
  }
}

// Value checks on host memory: 0 <= seg_indptr[0] <= ... <= seg_indptr[S] == T, every id in [-1, N).
// O(S*K); the CPU kernel runs them on every call, since its loops trust these values.
inline void check_multi_lora_values(const int32_t* seg_indptr, int64_t S, const int32_t* lora_ids, int64_t K,
                                    int64_t T, int64_t N) {
  TORCH_CHECK(seg_indptr[0] >= 0, "multi_lora: `seg_indptr` must start at >= 0, got ", seg_indptr[0]);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(seg_indptr[s + 1] >= seg_indptr[s], "multi_lora: `seg_indptr` must be non-decreasing, got ",
                seg_indptr[s], " then ", seg_indptr[s + 1], " at position ", s);
  }
  TORCH_CHECK(seg_indptr[S] == T, "multi_lora: `seg_indptr` must end at T=", T, ", ends at ", seg_indptr[S]);
  for (int64_t i = 0; i < S * K; ++i) {
    TORCH_CHECK(lora_ids[i] >= -1 && lora_ids[i] < N, "multi_lora: `lora_ids` contains ", lora_ids[i],
                " at [", i / K, ", ", i % K, "]; ids must be in [-1, N=", N, ") with -1 = empty slot");
  }
}

}  // namespace dlp_lora
