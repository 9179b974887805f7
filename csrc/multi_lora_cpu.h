// Knobs of the CPU kernel, exposed on dlp_lora._C for tests and benchmarks (see registration.cpp).
#pragma once

#include <cstdint>
#include <string>

namespace dlp_lora::cpu {

// Segments with at least this many rows take the gather + GEMM path, shorter ones the fused loops.
// A value <= 0 restores the measured per-dtype default. Returns the previous setting (0 = default).
int64_t set_gemm_min_rows(int64_t rows);
// The threshold in effect for a dtype name ("float32", "float16", "bfloat16").
int64_t gemm_min_rows(const std::string& dtype);

}  // namespace dlp_lora::cpu
