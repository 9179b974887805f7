// The `cpp` backend: torch.ops.dlp_lora.multi_lora on CPU tensors (fp32 / fp16 / bf16).
//
//   y[t] += sum_k w[s,k] * B[id] (A[id] x[t])      for t in segment s, id = lora_ids[s,k] >= 0
//
// Two paths, chosen per segment by its length (threshold measured by benchmarks/bench_ops.py):
//  * short segments (decode: one token per sequence, each with its own mixture) -> fused loops.
//    Shrink: the uses of each distinct adapter are grouped, so every row of A[n] is read once per call
//    and dotted with up to 4 token rows at a time -> u [tokens, K, r] in fp32, already times w.
//    Expand: parallel over blocks of output features; within a block every token reads its adapters'
//    B rows (which stay in L1/L2 across tokens) and y is rounded once: y = T(float(y) + delta).
//  * long segments (prefill) -> gather the segment's K adapters into A_cat [K*r, d_in] and
//    B_cat [d_out, K*r] (w folded in), then two GEMMs (MKL / oneDNN, AMX for bf16 where present);
//    the second one accumulates into y in place. The [len, K*r] intermediate has x's dtype there,
//    as in every GEMM-based LoRA implementation.
// Both paths use fp32 accumulation. The vector loops live in multi_lora_cpu_loops.h.
#include "multi_lora_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "multi_lora_checks.h"
#include "multi_lora_cpu_simd.h"

namespace dlp_lora::cpu {
namespace {

std::atomic<int64_t> g_gemm_min_rows{0};  // 0 = per-dtype default

// Measured on a 2-core Sapphire Rapids VM (bench_ops.py::test_gemm_threshold, 4 segments of L rows,
// K=3, r=16, d=4096): the fused loops cost ~12 us per row in every dtype, gather + GEMM ~200 us per
// segment plus ~10 us (MKL fp32) or ~4-8 us (oneDNN bf16/fp16) per row. Crossovers: fp32 ~ 50 rows,
// bf16 / fp16 ~ 20-30 rows.
int64_t default_gemm_min_rows(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return 24;
    case at::kHalf: return 24;
    default: return 48;
  }
}

// Below this many multiply-adds (~10 us on one core) a parallel region costs more than it saves: its
// fork/join is a few us on an idle machine, and a whole scheduler tick when a worker thread has been
// descheduled (a busy machine). One decode token of a 4096-wide Linear (K*r = 48) stays on one core.
constexpr int64_t kMinParallelMacs = 1 << 18;
// The same for the gather copies of the GEMM path, in elements: they are bandwidth bound and each
// core streams its own share, so they pay off sooner.
constexpr int64_t kMinParallelCopy = 1 << 16;

template <typename T>
struct Args {
  T* y;
  const T* x;
  const T* a;
  const T* b;
  const int32_t* seg_indptr;
  const int32_t* lora_ids;
  const float* lora_weights;
  int64_t d_in, d_out, N, r, S, K;
};

// ---------------------------------------------------------------------------------------------------
// Short segments: grouped shrink, blocked expand.
template <typename T>
void fused_segments(const Args<T>& p, const std::vector<int64_t>& segs) {
  const Kernels<T>& kern = kernels<T>();
  const int64_t K = p.K, r = p.r, rp = padded_rank(r), d_in = p.d_in, d_out = p.d_out;
  const int64_t n_segs = static_cast<int64_t>(segs.size());

  // Compact numbering of the tokens we touch: f -> (token, segment index).
  std::vector<int64_t> tok_row, tok_seg;
  // Per segment: its active slots (B pointer, offset of the slot in a token's u row).
  std::vector<const T*> seg_b(n_segs * K);
  std::vector<int64_t> seg_uoff(n_segs * K), seg_nact(n_segs, 0);
  std::vector<int64_t> uses_per_adapter(p.N + 1, 0);
  for (int64_t si = 0; si < n_segs; ++si) {
    const int64_t s = segs[si], start = p.seg_indptr[s], len = p.seg_indptr[s + 1] - start;
    for (int64_t t = start; t < start + len; ++t) {
      tok_row.push_back(t);
      tok_seg.push_back(si);
    }
    for (int64_t k = 0; k < K; ++k) {
      const int32_t id = p.lora_ids[s * K + k];
      if (id < 0) continue;
      uses_per_adapter[id + 1] += len;
      seg_b[si * K + seg_nact[si]] = p.b + id * d_out * r;
      seg_uoff[si * K + seg_nact[si]] = k * rp;
      ++seg_nact[si];
    }
  }
  const int64_t n_tok = static_cast<int64_t>(tok_row.size());

  // u [n_tok, K, rp] fp32; the padding past r must read as zero, the rest is always written.
  const int64_t u_size = n_tok * K * rp;
  std::unique_ptr<float[]> u(new float[u_size]);
  if (rp != r) std::fill_n(u.get(), u_size, 0.f);

  // x rows of those tokens in fp32: the shrink reads each of them r*K times, so widen them only once.
  std::unique_ptr<float[]> x32;
  if constexpr (!std::is_same_v<T, float>) {
    x32.reset(new float[n_tok * d_in]);
    at::parallel_for(0, n_tok, n_tok * d_in < kMinParallelCopy ? n_tok : 1, [&](int64_t lo, int64_t hi) {
      for (int64_t f = lo; f < hi; ++f) kern.widen(p.x + tok_row[f] * d_in, x32.get() + f * d_in, d_in);
    });
  }

  // Group the (token, slot) uses by adapter (counting sort), so A[n] is streamed once.
  std::vector<int64_t> distinct;
  for (int64_t n = 0; n < p.N; ++n) {
    if (uses_per_adapter[n + 1] > 0) distinct.push_back(n);
    uses_per_adapter[n + 1] += uses_per_adapter[n];  // now: first use of adapter n+1
  }
  const int64_t n_uses = uses_per_adapter[p.N];
  std::vector<ShrinkUse> uses(n_uses);
  {
    std::vector<int64_t> fill(uses_per_adapter.begin(), uses_per_adapter.end() - 1);
    int64_t f = 0;
    for (int64_t si = 0; si < n_segs; ++si) {
      const int64_t s = segs[si], start = p.seg_indptr[s], len = p.seg_indptr[s + 1] - start;
      for (int64_t k = 0; k < K; ++k) {
        const int32_t id = p.lora_ids[s * K + k];
        if (id < 0) continue;
        for (int64_t i = 0; i < len; ++i) {
          const float* x_row;
          if constexpr (std::is_same_v<T, float>) {
            x_row = p.x + (start + i) * d_in;
          } else {
            x_row = x32.get() + (f + i) * d_in;
          }
          uses[fill[id]++] = ShrinkUse{x_row, u.get() + ((f + i) * K + k) * rp, p.lora_weights[s * K + k]};
        }
      }
      f += len;
    }
  }

  // Shrink. Task i = (group of rows j, adapter): consecutive tasks share j, so each thread gets a share
  // of the rows of EVERY adapter; a hot adapter (skewed routing) is then split evenly between threads.
  const int64_t n_adapters = static_cast<int64_t>(distinct.size());
  const int64_t rows = kern.shrink_rows;
  const int64_t shrink_tasks = n_adapters * ((r + rows - 1) / rows);
  const int64_t shrink_macs = n_uses * r * d_in;
  at::parallel_for(0, shrink_tasks, shrink_macs < kMinParallelMacs ? shrink_tasks : 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t j = rows * (i / n_adapters), n = distinct[i % n_adapters];
      const int64_t first = uses_per_adapter[n], count = uses_per_adapter[n + 1] - first;
      kern.shrink(p.a + n * r * d_in, j, std::min(j + rows, r), d_in, uses.data() + first, count);
    }
  });

  // Expand. Task = (block of output features, chunk of tokens). Blocks keep every adapter's
  // B[o0:o1, :] hot in cache while all tokens of the chunk go through it.
  const int nthreads = at::get_num_threads();
  int64_t block = 256;
  while (block > 64 && (d_out + block - 1) / block < 4 * nthreads) block /= 2;
  const int64_t n_blocks = (d_out + block - 1) / block;
  const int64_t n_chunks = std::min<int64_t>(n_tok, std::max<int64_t>(1, (2 * nthreads + n_blocks - 1) / n_blocks));
  const int64_t expand_tasks = n_blocks * n_chunks;
  const int64_t expand_macs = n_uses * r * d_out;
  at::parallel_for(0, expand_tasks, expand_macs < kMinParallelMacs ? expand_tasks : 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t blk = i / n_chunks, chunk = i % n_chunks;
      const int64_t o0 = blk * block, o1 = std::min(d_out, o0 + block);
      const int64_t f0 = chunk * n_tok / n_chunks, f1 = (chunk + 1) * n_tok / n_chunks;
      for (int64_t f = f0; f < f1; ++f) {
        const int64_t si = tok_seg[f];
        kern.expand(p.y + tok_row[f] * d_out, o0, o1, r, seg_b.data() + si * K, u.get() + f * K * rp,
                    seg_uoff.data() + si * K, seg_nact[si]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// One long segment: gather its adapters, then two GEMMs, the second accumulating into y.
template <typename T>
void gemm_segment(const Args<T>& p, const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_b,
                  int64_t start, int64_t len, const int32_t* ids, const float* weights) {
  const Kernels<T>& kern = kernels<T>();
  const int64_t r = p.r, d_in = p.d_in, d_out = p.d_out;
  std::vector<int64_t> act_ids;
  std::vector<float> act_w;
  for (int64_t k = 0; k < p.K; ++k) {
    if (ids[k] < 0) continue;
    act_ids.push_back(ids[k]);
    act_w.push_back(weights[k]);
  }
  const int64_t ka = static_cast<int64_t>(act_ids.size()), kr = ka * r;
  // A_cat [ka*r, d_in]: rows w_k * A[id_k][j]. The mixture weight folds in here (one rounding in x's
  // dtype for fp16/bf16), so the second GEMM needs no scaling and y is updated once.
  const at::Tensor a_cat = at::empty({kr, d_in}, x.options());
  T* a_dst = reinterpret_cast<T*>(a_cat.data_ptr());
  at::parallel_for(0, kr, kr * d_in < kMinParallelCopy ? kr : 1, [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) {
      const int64_t k = q / r, j = q % r;
      kern.scale(p.a + (act_ids[k] * r + j) * d_in, a_dst + q * d_in, d_in, act_w[k]);
    }
  });
  // B_cat [d_out, ka*r]: the blocks B[id_k] [d_out, r] side by side (just B[id] for one adapter).
  at::Tensor b_cat;
  if (ka == 1) {
    b_cat = lora_b.select(0, act_ids[0]);
  } else {
    b_cat = at::empty({d_out, kr}, x.options());
    T* b_dst = reinterpret_cast<T*>(b_cat.data_ptr());
    at::parallel_for(0, d_out, d_out * kr < kMinParallelCopy ? d_out : 1, [&](int64_t lo, int64_t hi) {
      for (int64_t o = lo; o < hi; ++o) {
        for (int64_t k = 0; k < ka; ++k) {
          std::memcpy(b_dst + o * kr + k * r, p.b + (act_ids[k] * d_out + o) * r, r * sizeof(T));
        }
      }
    });
  }
  const at::Tensor u = at::mm(x.narrow(0, start, len), a_cat.t());  // [len, ka*r], MKL / oneDNN
  y.narrow(0, start, len).addmm_(u, b_cat.t());
}

template <typename T>
void run(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
         const at::Tensor& seg_indptr, const at::Tensor& lora_ids, const at::Tensor& lora_weights) {
  Args<T> p{reinterpret_cast<T*>(y.data_ptr()),
            reinterpret_cast<const T*>(x.const_data_ptr()),
            reinterpret_cast<const T*>(lora_a.const_data_ptr()),
            reinterpret_cast<const T*>(lora_b.const_data_ptr()),
            seg_indptr.const_data_ptr<int32_t>(),
            lora_ids.const_data_ptr<int32_t>(),
            lora_weights.const_data_ptr<float>(),
            x.size(1), lora_b.size(1), lora_a.size(0), lora_a.size(1), lora_ids.size(0), lora_ids.size(1)};
  const int64_t min_rows = g_gemm_min_rows.load() > 0 ? g_gemm_min_rows.load() : default_gemm_min_rows(x.scalar_type());
  std::vector<int64_t> fused;
  for (int64_t s = 0; s < p.S; ++s) {
    const int64_t start = p.seg_indptr[s], len = p.seg_indptr[s + 1] - start;
    const int32_t* ids = p.lora_ids + s * p.K;
    if (len == 0 || std::all_of(ids, ids + p.K, [](int32_t id) { return id < 0; })) continue;  // y untouched
    if (len >= min_rows) {
      gemm_segment<T>(p, y, x, lora_b, start, len, ids, p.lora_weights + s * p.K);
    } else {
      fused.push_back(s);
    }
  }
  if (!fused.empty()) fused_segments<T>(p, fused);
}

void multi_lora_cpu(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    const at::Tensor& seg_indptr, const at::Tensor& lora_ids, const at::Tensor& lora_weights) {
  check_multi_lora_layout(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights, c10::DeviceType::CPU);
  check_multi_lora_values(seg_indptr.const_data_ptr<int32_t>(), lora_ids.size(0), lora_ids.const_data_ptr<int32_t>(),
                          lora_ids.size(1), x.size(0), lora_a.size(0));
  if (x.size(0) == 0 || lora_ids.numel() == 0 || lora_a.size(1) == 0 || y.size(1) == 0) return;
  switch (x.scalar_type()) {
    case at::kFloat: return run<float>(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights);
    case at::kBFloat16: return run<bf16_t>(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights);
    case at::kHalf: return run<f16_t>(y, x, lora_a, lora_b, seg_indptr, lora_ids, lora_weights);
    default: TORCH_CHECK(false, "multi_lora: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace

int64_t set_gemm_min_rows(int64_t rows) { return g_gemm_min_rows.exchange(rows > 0 ? rows : 0); }

int64_t gemm_min_rows(const std::string& dtype) {
  const int64_t forced = g_gemm_min_rows.load();
  if (forced > 0) return forced;
  if (dtype == "bfloat16") return default_gemm_min_rows(at::kBFloat16);
  if (dtype == "float16") return default_gemm_min_rows(at::kHalf);
  return default_gemm_min_rows(at::kFloat);
}

}  // namespace dlp_lora::cpu

TORCH_LIBRARY_IMPL(dlp_lora, CPU, m) { m.impl("multi_lora", &dlp_lora::cpu::multi_lora_cpu); }
