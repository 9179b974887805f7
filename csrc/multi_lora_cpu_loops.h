// The vector loops of the CPU kernel, written once against a `Vec` type (W floats per register) that
// the including namespace defines. multi_lora_cpu_simd.cpp includes this file once per instruction set,
// each time inside its own namespace and target pragma, so there is deliberately NO include guard and
// no #include here.
//
// Vec must provide: F (vector of W floats), W, zero(), load(p) / load_partial(p, n) for float, bf16_t
// and f16_t (widened to fp32), set1(w), fma(a, b, c), add(a, b), mul(a, b), hsum(v), reduce_rows(F[W]) (lane i = sum of
// vector i), store / store_partial(p, v[, n]) to float, bf16_t, f16_t with round-to-nearest-even.

// Dot products of NR rows of A with NU token rows (fp32) at once: each A vector is loaded (and
// widened) once per NU FMAs, each x vector once per NR. C independent chains per accumulator hide the
// FMA latency when the tile is small (decode: one token).
template <typename T, int NR, int NU>
inline void dot_tile(const T* a, int64_t d, const ShrinkUse* uses, int64_t j) {
  constexpr int W = Vec::W;
  constexpr int C = NR * NU >= 8 ? 1 : 2;
  typename Vec::F acc[C][NR][NU];
  const float* xs[NU];
  for (int u = 0; u < NU; ++u) xs[u] = uses[u].x_row;
  for (int c = 0; c < C; ++c)
    for (int q = 0; q < NR; ++q)
      for (int u = 0; u < NU; ++u) acc[c][q][u] = Vec::zero();
  int64_t i = 0;
  for (; i + C * W <= d; i += C * W) {
    for (int c = 0; c < C; ++c) {
      typename Vec::F av[NR];
      for (int q = 0; q < NR; ++q) av[q] = Vec::load(a + q * d + i + c * W);
      for (int u = 0; u < NU; ++u) {
        const auto xv = Vec::load(xs[u] + i + c * W);
        for (int q = 0; q < NR; ++q) acc[c][q][u] = Vec::fma(av[q], xv, acc[c][q][u]);
      }
    }
  }
  for (; i < d; i += W) {  // the last vectors; the final one masked so no load passes the row's end
    const int64_t n = d - i < W ? d - i : W;
    typename Vec::F av[NR];
    for (int q = 0; q < NR; ++q) av[q] = n == W ? Vec::load(a + q * d + i) : Vec::load_partial(a + q * d + i, n);
    for (int u = 0; u < NU; ++u) {
      const auto xv = n == W ? Vec::load(xs[u] + i) : Vec::load_partial(xs[u] + i, n);
      for (int q = 0; q < NR; ++q) acc[0][q][u] = Vec::fma(av[q], xv, acc[0][q][u]);
    }
  }
  for (int q = 0; q < NR; ++q) {
    for (int u = 0; u < NU; ++u) {
      auto sum = acc[0][q][u];
      for (int c = 1; c < C; ++c) sum = Vec::add(sum, acc[c][q][u]);
      uses[u].u_out[j + q] = uses[u].weight * Vec::hsum(sum);
    }
  }
}

template <typename T, int NR>
inline void shrink_rows(const T* a, int64_t d_in, const ShrinkUse* uses, int64_t n_uses, int64_t j) {
  int64_t u = 0;
  for (; u + 4 <= n_uses; u += 4) dot_tile<T, NR, 4>(a, d_in, uses + u, j);
  switch (n_uses - u) {
    case 3: dot_tile<T, NR, 3>(a, d_in, uses + u, j); break;
    case 2: dot_tile<T, NR, 2>(a, d_in, uses + u, j); break;
    case 1: dot_tile<T, NR, 1>(a, d_in, uses + u, j); break;
    default: break;
  }
}

// Rows of A handled together: 4 x 4 accumulators fit AVX-512's 32 registers, AVX2's 16 hold 2 x 4.
constexpr int64_t kShrinkRows = Vec::W >= 16 ? 4 : 2;

template <typename T>
void shrink(const T* a, int64_t j0, int64_t j1, int64_t d_in, const ShrinkUse* uses, int64_t n_uses) {
  int64_t j = j0;
  if constexpr (kShrinkRows >= 4) {
    for (; j + 4 <= j1; j += 4) shrink_rows<T, 4>(a + j * d_in, d_in, uses, n_uses, j);
  }
  for (; j + 2 <= j1; j += 2) shrink_rows<T, 2>(a + j * d_in, d_in, uses, n_uses, j);
  if (j < j1) shrink_rows<T, 1>(a + j * d_in, d_in, uses, n_uses, j);
}

template <typename T>
void widen(const T* src, float* dst, int64_t n) {
  constexpr int W = Vec::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) Vec::store(dst + i, Vec::load(src + i));
  if (i < n) Vec::store_partial(dst + i, Vec::load_partial(src + i, n - i), n - i);
}

template <typename T>
void scale(const T* src, T* dst, int64_t n, float w) {
  constexpr int W = Vec::W;
  const auto wv = Vec::set1(w);
  int64_t i = 0;
  for (; i + W <= n; i += W) Vec::store(dst + i, Vec::mul(Vec::load(src + i), wv));
  if (i < n) Vec::store_partial(dst + i, Vec::mul(Vec::load_partial(src + i, n - i), wv), n - i);
}

// Accumulate ROWS (<= W) output rows o..o+ROWS-1 of every slot into acc[0..ROWS): slot-outer, so the
// slot's u vectors stay in registers while its B rows stream by. R > 0: rank known at compile time.
template <typename T, int64_t R, int ROWS>
inline void expand_block(typename Vec::F* acc, int64_t rows, int64_t o, int64_t r, const T* const* b,
                         const float* u_row, const int64_t* u_off, int64_t n_slots) {
  constexpr int W = Vec::W;
  const int64_t rank = R > 0 ? R : r;
  const int64_t n_rows = ROWS > 0 ? ROWS : rows;
  for (int64_t i = 0; i < W; ++i) acc[i] = Vec::zero();
  for (int64_t k = 0; k < n_slots; ++k) {
    const T* bk = b[k] + o * rank;
    const float* uk = u_row + u_off[k];  // zero-padded past r: whole-vector loads are safe
    if constexpr (R > 0 && R <= 4 * W) {
      constexpr int64_t CH = (R + W - 1) / W;
      typename Vec::F uv[CH];
      for (int64_t c = 0; c < CH; ++c) uv[c] = Vec::load(uk + c * W);
      for (int64_t i = 0; i < n_rows; ++i) {
        for (int64_t c = 0; c < CH; ++c) {
          const int64_t left = rank - c * W;
          // B is not padded: its last chunk is a masked load (never past the bank's end).
          const auto bv = left >= W ? Vec::load(bk + i * rank + c * W) : Vec::load_partial(bk + i * rank + c * W, left);
          acc[i] = Vec::fma(bv, uv[c], acc[i]);
        }
      }
    } else {
      for (int64_t i = 0; i < n_rows; ++i) {
        for (int64_t c = 0; c < rank; c += W) {
          const int64_t left = rank - c;
          const auto bv = left >= W ? Vec::load(bk + i * rank + c) : Vec::load_partial(bk + i * rank + c, left);
          acc[i] = Vec::fma(bv, Vec::load(uk + c), acc[i]);
        }
      }
    }
  }
}

template <typename T, int64_t R>
void expand_rank(T* y_row, int64_t o0, int64_t o1, int64_t r, const T* const* b, const float* u_row,
                 const int64_t* u_off, int64_t n_slots) {
  constexpr int W = Vec::W;
  typename Vec::F acc[W];
  int64_t o = o0;
  for (; o + W <= o1; o += W) {
    expand_block<T, R, W>(acc, W, o, r, b, u_row, u_off, n_slots);
    // One transpose-and-add turns W accumulators into the W row sums (instead of W horizontal sums).
    Vec::store(y_row + o, Vec::add(Vec::load(y_row + o), Vec::reduce_rows(acc)));
  }
  if (o < o1) {
    const int64_t rows = o1 - o;
    expand_block<T, R, 0>(acc, rows, o, r, b, u_row, u_off, n_slots);
    Vec::store_partial(y_row + o, Vec::add(Vec::load_partial(y_row + o, rows), Vec::reduce_rows(acc)), rows);
  }
}

template <typename T>
void expand(T* y_row, int64_t o0, int64_t o1, int64_t r, const T* const* b, const float* u_row,
            const int64_t* u_off, int64_t n_slots) {
  // The common PEFT ranks get fully unrolled inner loops.
  switch (r) {
    case 8: return expand_rank<T, 8>(y_row, o0, o1, r, b, u_row, u_off, n_slots);
    case 16: return expand_rank<T, 16>(y_row, o0, o1, r, b, u_row, u_off, n_slots);
    case 32: return expand_rank<T, 32>(y_row, o0, o1, r, b, u_row, u_off, n_slots);
    case 64: return expand_rank<T, 64>(y_row, o0, o1, r, b, u_row, u_off, n_slots);
    default: return expand_rank<T, 0>(y_row, o0, o1, r, b, u_row, u_off, n_slots);
  }
}

// The table of this instruction set; an instance may pass its own, more specialised expand.
template <typename T>
const Kernels<T>& kernel_table(const char* isa, decltype(Kernels<T>::expand) expand_fn = &expand<T>) {
  static const Kernels<T> table{isa, kShrinkRows, &widen<T>, &scale<T>, &shrink<T>, expand_fn};
  return table;
}
