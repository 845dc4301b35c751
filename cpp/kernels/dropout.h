#pragma once
// \brief The bias_dropout_add kernels (kernels/cpu/dropout.cpp, kernels/cuda/dropout.cu) and the keep mask
//        both draw. x/residual/out/grad are contiguous [rows, cols] of `dtype`; bias is [cols] or null. Math
//        in fp32 (fp64 for fp64), one rounding on store.
//
// The keep mask is a function of (seed, element index) only (kernels/philox.h): element e (linear index in
// the contiguous [rows, cols] layout) is kept iff word word_of(e) of Philox-4x32-10(counter_of(e), seed) is
// >= keep_threshold(p), and a kept element is multiplied by scale(p) = 1 / (1 - p). p == 0 draws nothing.
#include "kernels/common.h"
#include "kernels/philox.h"

namespace megacore::kernels {

struct BiasDropoutAddForward {
  const void* x;
  const void* bias;      // may be null
  const void* residual;
  void* out;             // out = residual + keep * (x + bias) / (1 - p)
  int64_t rows, cols;
  DType dtype;
  double p;              // in [0, 1)
  int64_t seed;
};

struct BiasDropoutAddBackward {
  const void* grad_out;
  void* grad_x;          // grad_out * keep / (1 - p)
  void* grad_bias;       // [cols] of dtype: column sums of grad_x; null when not wanted
  void* workspace;       // CUDA, when grad_bias: [column_partial_rows(rows), cols] of the accumulation type
  int64_t rows, cols;
  DType dtype;
  double p;
  int64_t seed;
};

namespace dropout {

/// The Philox counter that draws element e's word, and which of its 4 output words it is.
MEGACORE_HD uint64_t counter_of(int64_t e) { return static_cast<uint64_t>(e) / 4; }
MEGACORE_HD int word_of(int64_t e) { return static_cast<int>(static_cast<uint64_t>(e) % 4); }

/// Keep iff the element's word u >= keep_threshold(p) (kernels/philox.h: ceil(p 2^32), capped).
inline uint32_t threshold(double p) { return philox::keep_threshold(p); }
MEGACORE_HD bool keep(uint32_t u, uint32_t threshold) { return u >= threshold; }

/// The multiplier of a kept element, 1 / (1 - p), rounded once to the accumulation type A.
template <typename A>
inline A scale(double p) {
  return static_cast<A>(1.0 / (1.0 - p));
}

/// The multiplier of an element whose word is u: scale if kept, else 0.
template <typename A>
MEGACORE_HD A multiplier(uint32_t u, uint32_t threshold, A scale) {
  return keep(u, threshold) ? scale : A(0);
}

}  // namespace dropout
}  // namespace megacore::kernels

MEGACORE_KERNEL(bias_dropout_add_forward, BiasDropoutAddForward)
MEGACORE_KERNEL(bias_dropout_add_backward, BiasDropoutAddBackward)
