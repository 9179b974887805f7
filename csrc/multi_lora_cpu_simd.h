// Inner loops of the CPU multi-LoRA kernel, one instance per instruction set (AVX-512, AVX2, generic),
// chosen at run time: setup.py compiles without -march=native so the wheel runs on any x86-64 (or ARM)
// CPU, and the vector loops are compiled with per-function target pragmas instead
// (multi_lora_cpu_simd.cpp). Torch-free: raw pointers only. The torch glue (multi_lora_cpu.cpp) plans the
// work, threads it, and calls these.
#pragma once

#include <cstdint>

namespace dlp_lora::cpu {

// Storage types of the 16-bit floats (same bits as c10::BFloat16 / c10::Half).
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// Every fp32 intermediate row of one slot is padded with zeros to a multiple of this many floats
// (the widest vector), so the expand loop can load it in whole vectors.
constexpr int64_t kRankPad = 16;
inline int64_t padded_rank(int64_t r) { return (r + kRankPad - 1) / kRankPad * kRankPad; }

// One (token, slot) pair that reads adapter n's A in the shrink step.
struct ShrinkUse {
  const float* x_row;  // [d_in] the token's activations, widened to fp32 once per call
  float* u_out;        // [r] where  weight * A[n] x_row  goes (fp32)
  float weight;        // lora_weights[s, k]
};

template <typename T>
struct Kernels {
  const char* isa;
  // Rows of A one shrink call should get (its register tile height).
  int64_t shrink_rows;
  // dst[i] = float(src[i]) for i < n.
  void (*widen)(const T* src, float* dst, int64_t n);
  // dst[i] = round_to_T(w * float(src[i])) for i < n.
  void (*scale)(const T* src, T* dst, int64_t n, float w);
  // For rows j in [j0, j1) of one adapter's A [r, d_in] (a points at row 0), and every use:
  //   use.u_out[j] = use.weight * dot(a[j, :], use.x_row)        (fp32 accumulation)
  void (*shrink)(const T* a, int64_t j0, int64_t j1, int64_t d_in, const ShrinkUse* uses,
                 int64_t n_uses);
  // For o in [o0, o1):  y_row[o] = round_to_T( float(y_row[o]) + sum_k dot(b[k][o*r : o*r+r], u_k) )
  // with u_k = u_row + u_off[k]: fp32, zero-padded to padded_rank(r); b[k] is one adapter's B [d_out, r].
  void (*expand)(T* y_row, int64_t o0, int64_t o1, int64_t r, const T* const* b, const float* u_row,
                 const int64_t* u_off, int64_t n_slots);
};

// The best kernels this CPU supports (or the ones forced by set_isa / $DLP_LORA_CPU_ISA).
template <typename T>
const Kernels<T>& kernels();

// "avx512", "avx2" or "generic": the instruction set kernels() returns now.
const char* active_isa();
// Force an instruction set ("avx512", "avx2", "generic", or "auto" = best supported). Returns false
// (and changes nothing) when the CPU or this build lacks it. Used by tests to cover every path.
bool set_isa(const char* name);

}  // namespace dlp_lora::cpu
