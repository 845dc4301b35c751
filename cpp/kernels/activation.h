#pragma once
// \brief The bias_gelu kernels (kernels/cpu/activation.cpp, kernels/cuda/activation.cu) and the GeLU both
//        compute. x/out/grad are contiguous [rows, cols] of `dtype`; bias is [cols] or null. Math in fp32 (fp64
//        for fp64), one rounding on store.
#include "kernels/common.h"

namespace megacore::kernels {

struct BiasGeluForward {
  const void* x;
  const void* bias;  // may be null
  void* out;         // out = gelu(x + bias)
  int64_t rows, cols;
  DType dtype;
  bool tanh;  // the tanh approximation, else the exact erf form
};

struct BiasGeluBackward {
  const void* grad_out;
  const void* x;
  const void* bias;  // may be null
  void* grad_x;      // grad_out * gelu'(x + bias)
  void* grad_bias;   // [cols] of dtype: column sums of grad_x; null when not wanted
  void* workspace;   // CUDA, when grad_bias: [column_partial_rows(rows), cols] of the accumulation type
  int64_t rows, cols;
  DType dtype;
  bool tanh;
};

namespace gelu {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCoeff = 0.044715;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

/// sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): 0.5 (1 + tanh(u)) written with one exp and one division
/// (about twice as fast as a vector tanh on CPU).
template <typename V>
MEGACORE_HD V sigmoid_2u(V x) {
  const V u = splat<V>(kSqrt2OverPi) * (x + splat<V>(kCoeff) * x * x * x);
  return splat<V>(1) / (splat<V>(1) + Math<V>::fast_exp(splat<V>(-2) * u));
}

/// gelu(x): x * sigmoid(2u) (tanh), or x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)).
template <typename V>
MEGACORE_HD V forward(V x, bool tanh) {
  if (tanh) return x * sigmoid_2u(x);
  return splat<V>(0.5) * x * (splat<V>(1) + Math<V>::erf(x * splat<V>(kInvSqrt2)));
}

/// gelu'(x): s + 2 x s (1 - s) du/dx with s = sigmoid(2u) (tanh), or Phi(x) + x phi(x).
template <typename V>
MEGACORE_HD V grad(V x, bool tanh) {
  const V one = splat<V>(1);
  if (tanh) {
    const V s = sigmoid_2u(x);
    const V du = splat<V>(kSqrt2OverPi) * (one + splat<V>(3 * kCoeff) * x * x);
    return s + splat<V>(2) * x * s * (one - s) * du;
  }
  const V cdf = splat<V>(0.5) * (one + Math<V>::erf(x * splat<V>(kInvSqrt2)));
  return cdf + x * Math<V>::exp(splat<V>(-0.5) * x * x) * splat<V>(kInvSqrt2Pi);
}

}  // namespace gelu
}  // namespace megacore::kernels

MEGACORE_KERNEL(bias_gelu_forward, BiasGeluForward)
MEGACORE_KERNEL(bias_gelu_backward, BiasGeluBackward)
