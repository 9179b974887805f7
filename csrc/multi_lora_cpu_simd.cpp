// Instances of the CPU kernel's vector loops (multi_lora_cpu_loops.h) for AVX-512, AVX2+FMA+F16C and
// plain C++, and the run-time choice between them.
//
// Why not at::vec::Vectorized: an extension built without -march flags only gets its generic
// (scalar-array) version, and -march=native would make the wheel crash on older CPUs. Instead each
// instance is compiled under a target pragma and picked with __builtin_cpu_supports (which also checks
// that the OS saves the wide registers).
//
// Rounding to the 16-bit types is round-to-nearest-even, bit-identical to c10::BFloat16 / c10::Half
// (NaN becomes the canonical 0x7FC0 for bf16, as in c10).
#include "multi_lora_cpu_simd.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DLP_LORA_X86_SIMD 1
#include <immintrin.h>
// GCC 12 reports the _mm512_undefined_* placeholders inside its own AVX-512 conversion intrinsics as
// "(may be) used uninitialized" (GCC bug 105593, fixed in 13): 774 false warnings per -Wall build
// that would bury real ones.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#endif

namespace dlp_lora::cpu {

// ---------------------------------------------------------------------------------------------------
// Generic C++ (any CPU): one float per "vector"; the compiler may still auto-vectorize.
namespace generic {
struct Vec {
  using F = float;
  static constexpr int W = 1;
  static F zero() { return 0.f; }
  static F load(const float* p) { return *p; }
  static F load(const bf16_t* p) { return c10::detail::f32_from_bits(p->bits); }
  static F load(const f16_t* p) { return c10::detail::fp16_ieee_to_fp32_value(p->bits); }
  template <typename T>
  static F load_partial(const T* p, int64_t) { return load(p); }
  // a*b+c, not std::fma: without hardware FMA std::fma is a slow exact library call.
  static F fma(F a, F b, F c) { return a * b + c; }
  static F add(F a, F b) { return a + b; }
  static F mul(F a, F b) { return a * b; }
  static F set1(float v) { return v; }
  static float hsum(F a) { return a; }
  static F reduce_rows(const F* acc) { return acc[0]; }
  static void store(float* p, F v) { *p = v; }
  static void store(bf16_t* p, F v) { p->bits = c10::detail::round_to_nearest_even(v); }
  static void store(f16_t* p, F v) { p->bits = c10::detail::fp16_ieee_from_fp32_value(v); }
  template <typename T>
  static void store_partial(T* p, F v, int64_t) { store(p, v); }
};
#include "multi_lora_cpu_loops.h"
}  // namespace generic

#ifdef DLP_LORA_X86_SIMD

// Shared by both x86 instances: copy a short tail into a zeroed buffer (used where the ISA has no
// masked load for that element type), so no load ever reaches past the end of a row.
template <typename T, int W>
struct Tail {
  T buf[W];
  Tail(const T* p, int64_t n) {
    std::memset(buf, 0, sizeof(buf));
    std::memcpy(buf, p, sizeof(T) * n);
  }
};

// ---------------------------------------------------------------------------------------------------
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif
namespace avx512 {
struct Vec {
  using F = __m512;
  static constexpr int W = 16;
  static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static F widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const bf16_t* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static F load_partial(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static F load_partial(const bf16_t* p, int64_t n) { return widen_bf16(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static F load_partial(const f16_t* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static float hsum(F a) { return _mm512_reduce_add_ps(a); }
  static __m256i narrow_bf16(F v) {  // c10::detail::round_to_nearest_even, 16 lanes at once
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i out = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    out = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), out, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(out);
  }
  static __m256i narrow_f16(F v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(bf16_t* p, F v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(v)); }
  static void store(f16_t* p, F v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_f16(v)); }
  static void store_partial(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static void store_partial(bf16_t* p, F v, int64_t n) { _mm256_mask_storeu_epi16(p, mask(n), narrow_bf16(v)); }
  static void store_partial(f16_t* p, F v, int64_t n) { _mm256_mask_storeu_epi16(p, mask(n), narrow_f16(v)); }
  // Lane i of the result = sum of the 16 lanes of a[i]: 4 rounds of shuffle+add instead of 16 hsums.
  static F reduce_rows(const F* a) {
    __m512 quad[4];  // quad[q] lane group g holds partial sums of a[4q..4q+3] (one float each)
    for (int q = 0; q < 4; ++q) {
      const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a[4 * q], a[4 * q + 1]),
                                       _mm512_unpackhi_ps(a[4 * q], a[4 * q + 1]));
      const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a[4 * q + 2], a[4 * q + 3]),
                                       _mm512_unpackhi_ps(a[4 * q + 2], a[4 * q + 3]));
      const __m512d d01 = _mm512_castps_pd(s01), d23 = _mm512_castps_pd(s23);
      quad[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));
    }
    // Fold the four 128-bit groups: [q0 g0+g1, q0 g2+g3, q1 g0+g1, q1 g2+g3], then once more.
    const __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88), _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
    const __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88), _mm512_shuffle_f32x4(quad[2], quad[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, 0x88), _mm512_shuffle_f32x4(h01, h23, 0xDD));
  }
};
#include "multi_lora_cpu_loops.h"

// Expand with B rows read as whole 64-byte chunks, for the ranks where a chunk holds RPC = 2 or 4 whole
// rows (fp32 r = 4, 8; bf16 r = 8, 16) or a row is a whole number of chunks (fp32 r = 16, 32, 64;
// bf16 r = 32, 64). bf16 chunks are widened as even/odd halves (one shift, one and: no per-element
// conversion), and u is permuted to the same lane pattern once per call. An accumulator then holds
// RPC rows of LPR = 16 / RPC lanes each, so a 16-row block needs only log2(LPR) reduction rounds.
// Versus the generic loop: no masked loads for r < 16, ~40% fewer instructions for bf16.
template <typename T, int64_t R>
struct Packed {
  static constexpr int64_t kBytes = sizeof(T);
  static constexpr int64_t kRowBytes = R * kBytes;
  static constexpr int64_t kRowsPerChunk = kRowBytes >= 64 ? 1 : 64 / kRowBytes;
  static constexpr int64_t kChunksPerRow = kRowBytes >= 64 ? kRowBytes / 64 : 1;
  static constexpr int64_t kVecsPerChunk = kBytes == 2 ? 2 : 1;  // bf16: even and odd elements
  static constexpr int64_t kLanesPerRow = 16 / kRowsPerChunk;
  static constexpr int64_t kAcc = 16 / kRowsPerChunk;  // accumulators per 16-row block
  static constexpr int64_t kMaxSlots = 8;               // u patterns live on the stack

  // Element of the chunk that lane i of vector v holds.
  static int64_t element(int64_t i, int64_t v) { return kVecsPerChunk == 2 ? 2 * i + v : i; }

  // u_k permuted so lane i of pattern (c, v) multiplies what lane i of chunk c's vector v holds.
  static __m512 pattern(const float* u_k, int64_t c, int64_t v) {
    alignas(64) int32_t idx[16];
    if constexpr (kRowsPerChunk > 1) {
      for (int64_t i = 0; i < 16; ++i) idx[i] = static_cast<int32_t>(element(i, v) % R);
      return _mm512_permutexvar_ps(_mm512_load_si512(idx), _mm512_loadu_ps(u_k));  // R <= 16: one vector
    } else if constexpr (kVecsPerChunk == 1) {
      return _mm512_loadu_ps(u_k + c * 16);
    } else {  // bf16, a row of >= 32 elements: lanes 2i+v of the 32 floats u_k[32c : 32c+32]
      for (int64_t i = 0; i < 16; ++i) idx[i] = static_cast<int32_t>(element(i, v));
      return _mm512_permutex2var_ps(_mm512_loadu_ps(u_k + c * 32), _mm512_load_si512(idx),
                                    _mm512_loadu_ps(u_k + c * 32 + 16));
    }
  }

  static void widen_chunk(const T* p, __m512* out) {
    if constexpr (kVecsPerChunk == 1) {
      out[0] = _mm512_loadu_ps(reinterpret_cast<const float*>(p));
    } else {
      const __m512i v = _mm512_loadu_si512(p);
      out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));                              // even
      out[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF0000u)));  // odd
    }
  }

  // 16 row sums in row order from kAcc accumulators holding kRowsPerChunk rows each.
  static __m512 reduce(const __m512* acc) {
    if constexpr (kLanesPerRow == 16) return Vec::reduce_rows(acc);
    // Rounds 1-2 of Vec::reduce_rows: 128-bit group g, lane m <- sum of group g of acc[4q + m].
    __m512 quad[kAcc / 4];
    for (int64_t q = 0; q < kAcc / 4; ++q) {
      const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(acc[4 * q], acc[4 * q + 1]),
                                       _mm512_unpackhi_ps(acc[4 * q], acc[4 * q + 1]));
      const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(acc[4 * q + 2], acc[4 * q + 3]),
                                       _mm512_unpackhi_ps(acc[4 * q + 2], acc[4 * q + 3]));
      const __m512d d01 = _mm512_castps_pd(s01), d23 = _mm512_castps_pd(s23);
      quad[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d01, d23)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(d01, d23)));
    }
    alignas(64) int32_t idx[16];
    if constexpr (kLanesPerRow == 4) {  // acc[m] group g = row 4m+g, now at lane 4g+m
      for (int64_t row = 0; row < 16; ++row) idx[row] = static_cast<int32_t>(4 * (row % 4) + row / 4);
      return _mm512_permutexvar_ps(_mm512_load_si512(idx), quad[0]);
    } else {  // kLanesPerRow == 8: one more round; rows (2m, 2m+1) of acc[m] land at lanes (m, 4+m) (+8)
      const __m512 h = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88),
                                     _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
      for (int64_t row = 0; row < 16; ++row) {
        idx[row] = static_cast<int32_t>(8 * (row / 8) + 4 * (row % 2) + (row % 8) / 2);
      }
      return _mm512_permutexvar_ps(_mm512_load_si512(idx), h);
    }
  }

  static void expand(T* y_row, int64_t o0, int64_t o1, int64_t r, const T* const* b, const float* u_row,
                     const int64_t* u_off, int64_t n_slots) {
    if (n_slots > kMaxSlots) return expand_rank<T, R>(y_row, o0, o1, r, b, u_row, u_off, n_slots);
    __m512 upat[kMaxSlots][kChunksPerRow][kVecsPerChunk];
    for (int64_t k = 0; k < n_slots; ++k)
      for (int64_t c = 0; c < kChunksPerRow; ++c)
        for (int64_t v = 0; v < kVecsPerChunk; ++v) upat[k][c][v] = pattern(u_row + u_off[k], c, v);
    constexpr int64_t kChunkElems = 64 / kBytes;
    int64_t o = o0;
    for (; o + 16 <= o1; o += 16) {
      __m512 acc[kAcc];
      for (int64_t a = 0; a < kAcc; ++a) acc[a] = _mm512_setzero_ps();
      for (int64_t k = 0; k < n_slots; ++k) {
        const T* bk = b[k] + o * R;  // 16 rows = kAcc * kChunksPerRow whole chunks
        for (int64_t a = 0; a < kAcc; ++a) {
          for (int64_t c = 0; c < kChunksPerRow; ++c) {
            __m512 w[kVecsPerChunk];
            widen_chunk(bk + (a * kChunksPerRow + c) * kChunkElems, w);
            for (int64_t v = 0; v < kVecsPerChunk; ++v) acc[a] = _mm512_fmadd_ps(w[v], upat[k][c][v], acc[a]);
          }
        }
      }
      Vec::store(y_row + o, Vec::add(Vec::load(y_row + o), reduce(acc)));
    }
    if (o < o1) expand_rank<T, R>(y_row, o, o1, r, b, u_row, u_off, n_slots);  // last rows: generic loop
  }
};

template <typename T>
void expand_avx512(T* y_row, int64_t o0, int64_t o1, int64_t r, const T* const* b, const float* u_row,
                   const int64_t* u_off, int64_t n_slots) {
  if constexpr (std::is_same_v<T, float>) {
    switch (r) {
      case 4: return Packed<T, 4>::expand(y_row, o0, o1, r, b, u_row, u_off, n_slots);
      case 8: return Packed<T, 8>::expand(y_row, o0, o1, r, b, u_row, u_off, n_slots);
      default: break;
    }
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    switch (r) {
      case 8: return Packed<T, 8>::expand(y_row, o0, o1, r, b, u_row, u_off, n_slots);
      case 16: return Packed<T, 16>::expand(y_row, o0, o1, r, b, u_row, u_off, n_slots);
      case 32: return Packed<T, 32>::expand(y_row, o0, o1, r, b, u_row, u_off, n_slots);
      case 64: return Packed<T, 64>::expand(y_row, o0, o1, r, b, u_row, u_off, n_slots);
      default: break;
    }
  }
  expand<T>(y_row, o0, o1, r, b, u_row, u_off, n_slots);  // fp32 r = 16/32/64 is already whole vectors
}
}  // namespace avx512
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------------------------------------------
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
struct Vec {
  using F = __m256;
  static constexpr int W = 8;
  static F widen_bf16(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const bf16_t* p) { return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load_partial(const float* p, int64_t n) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes));
  }
  template <typename T>
  static F load_partial(const T* p, int64_t n) { return load(Tail<T, W>(p, n).buf); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static __m128i narrow_bf16(F v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i out = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    out = _mm256_blendv_epi8(out, _mm256_set1_epi32(0x7FC0), nan);
    // packus works within 128-bit lanes: pack, then gather the two useful quarters.
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(out, out), 0xD8));
  }
  static __m128i narrow_f16(F v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(bf16_t* p, F v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow_bf16(v)); }
  static void store(f16_t* p, F v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow_f16(v)); }
  template <typename T>
  static void store_partial(T* p, F v, int64_t n) {
    T buf[W];
    store(buf, v);
    std::memcpy(p, buf, sizeof(T) * n);
  }
  static F reduce_rows(const F* a) {
    __m256 quad[2];
    for (int q = 0; q < 2; ++q) {
      const __m256 s01 = _mm256_add_ps(_mm256_unpacklo_ps(a[4 * q], a[4 * q + 1]),
                                       _mm256_unpackhi_ps(a[4 * q], a[4 * q + 1]));
      const __m256 s23 = _mm256_add_ps(_mm256_unpacklo_ps(a[4 * q + 2], a[4 * q + 3]),
                                       _mm256_unpackhi_ps(a[4 * q + 2], a[4 * q + 3]));
      const __m256d d01 = _mm256_castps_pd(s01), d23 = _mm256_castps_pd(s23);
      quad[q] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(d01, d23)),
                              _mm256_castpd_ps(_mm256_unpackhi_pd(d01, d23)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(quad[0], quad[1], 0x20), _mm256_permute2f128_ps(quad[0], quad[1], 0x31));
  }
};
#include "multi_lora_cpu_loops.h"
}  // namespace avx2
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // DLP_LORA_X86_SIMD

// ---------------------------------------------------------------------------------------------------
// Run-time choice.
namespace {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

bool supported(Isa isa) {
#ifdef DLP_LORA_X86_SIMD
  if (isa == Isa::kAvx512) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
  if (isa == Isa::kAvx2) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }
#endif
  return isa == Isa::kGeneric;
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (supported(isa)) return isa;
  }
  return Isa::kGeneric;
}

bool parse_isa(const char* name, Isa* out) {
  if (name == nullptr || std::strcmp(name, "auto") == 0 || name[0] == '\0') {
    *out = best_isa();
  } else if (std::strcmp(name, "avx512") == 0) {
    *out = Isa::kAvx512;
  } else if (std::strcmp(name, "avx2") == 0) {
    *out = Isa::kAvx2;
  } else if (std::strcmp(name, "generic") == 0) {
    *out = Isa::kGeneric;
  } else {
    return false;
  }
  return supported(*out);
}

// $DLP_LORA_CPU_ISA lets a user step down (e.g. to rule out a vector-path bug); unknown or unsupported
// values fall back to the best supported set.
Isa initial_isa() {
  Isa isa;
  return parse_isa(std::getenv("DLP_LORA_CPU_ISA"), &isa) ? isa : best_isa();
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

template <typename T>
const Kernels<T>& kernels() {
  switch (static_cast<Isa>(current_isa().load(std::memory_order_relaxed))) {
#ifdef DLP_LORA_X86_SIMD
    case Isa::kAvx512: return avx512::kernel_table<T>("avx512", &avx512::expand_avx512<T>);
    case Isa::kAvx2: return avx2::kernel_table<T>("avx2");
#endif
    default: return generic::kernel_table<T>("generic");
  }
}

template const Kernels<float>& kernels<float>();
template const Kernels<bf16_t>& kernels<bf16_t>();
template const Kernels<f16_t>& kernels<f16_t>();

const char* active_isa() { return kernels<float>().isa; }

bool set_isa(const char* name) {
  Isa isa;
  if (!parse_isa(name, &isa)) return false;
  current_isa().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

}  // namespace dlp_lora::cpu
