#pragma once
// \brief The skinny-linear CPU kernel (kernels/cpu/linear.cpp): y = x @ w^T (+ bias) for a few rows of x, the
//        GEMMs of decoding (one token per sequence of a small batch). CPU only: on a GPU the vendor GEMM
//        handles few rows well, and ops/linear.cpp calls it there.
//
// Why a kernel of our own: at 2 to 16 rows the work is reading the weight once from memory, but ATen's CPU
// GEMM (oneDNN/MKL) blocks it like a large GEMM and reaches 7-13 GB/s where a single row streams at 20+ GB/s
// (docs/benchmarks.md, "Skinny linear"). This kernel reads each weight row once, dots it with every row of x
// (which stays in L1/L2), and prefetches the weight rows it reads next.
#include "kernels/common.h"

namespace megacore::kernels {

/// The most rows of x the kernel takes; more rows are a GEMM that ATen's blocking serves well.
constexpr int64_t kSkinnyLinearMaxRows = 16;

struct SkinnyLinear {
  const float* x;    // [rows, in] fp32 (a reduced-precision input converted once by the op: it is small)
  const void* w;     // [out, in] contiguous, `dtype`
  const void* bias;  // [out] of `dtype`, or null
  void* y;           // [rows, out] contiguous, `dtype`; each element rounded once from the fp32 dot product
  int64_t rows, in, out;
  DType dtype;       // kFloat32, kBFloat16 or kFloat16 (fp64 is ATen's)
};

}  // namespace megacore::kernels

MEGACORE_CPU_KERNEL(skinny_linear, void(const ::megacore::kernels::SkinnyLinear& p))
