#pragma once
// \brief The layer_norm / rms_norm kernels (kernels/cpu/norm.cpp, kernels/cuda/norm.cu) and the per-element
//        math both compute. x/out/grad are contiguous [rows, cols] of `dtype`; weight/bias are [cols] or
//        null; mean/rstd are [rows] of the accumulation type (fp32, fp64 for fp64). A null `mean` selects
//        RMSNorm (no centering, no bias). Math in fp32 (fp64 for fp64), one rounding on store.
#include "kernels/common.h"

namespace megacore::kernels {

struct NormForward {
  const void* x;
  const void* weight;  // [cols] or null
  const void* bias;    // [cols] or null (LayerNorm only)
  void* out;           // (x - mean) * rstd * weight + bias (RMSNorm: x * rstd * weight)
  void* mean;          // [rows]: LayerNorm writes the row means; null selects RMSNorm
  void* rstd;          // [rows]: 1 / sqrt(var + eps) (RMSNorm: 1 / sqrt(mean(x^2) + eps))
  int64_t rows, cols;
  double eps;
  DType dtype;
};

struct NormBackward {
  const void* grad_out;
  const void* x;
  const void* weight;  // [cols] or null
  const void* mean;    // [rows] saved by the forward; null selects RMSNorm
  const void* rstd;    // [rows] saved by the forward
  void* grad_x;        // rstd * (g - mean(g) - xhat * mean(g * xhat)), g = grad_out * weight
  void* grad_weight;   // [cols] of dtype: column sums of grad_out * xhat; null when not wanted
  void* grad_bias;     // [cols] of dtype: column sums of grad_out; null when not wanted
  void* workspace;     // CUDA, when a parameter gradient is wanted: [2, column_partial_rows(rows), cols] of
                       // the accumulation type
  int64_t rows, cols;
  DType dtype;
};

namespace norm {

/// xhat = (x - mean) * rstd: the normalized input (RMSNorm: mean = 0).
template <typename V>
MEGACORE_HD V normalize(V x, V mean, V rstd) {
  return (x - mean) * rstd;
}

/// The forward output: xhat * weight + bias, the weight and the bias each applied only when present
/// (RMSNorm: no bias).
template <typename V>
MEGACORE_HD V forward(V x, V mean, V rstd, bool has_weight, V weight, bool has_bias, V bias) {
  V y = normalize(x, mean, rstd);
  if (has_weight) y = y * weight;
  if (has_bias) y = y + bias;
  return y;
}

/// g = grad_out * weight (grad_out when there is no weight): the gradient reaching xhat.
template <typename V>
MEGACORE_HD V grad_xhat(V grad_out, bool has_weight, V weight) {
  return has_weight ? grad_out * weight : grad_out;
}

/// grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat)), given the row means mean_g of g (0 for RMSNorm)
/// and mean_gxhat of g * xhat.
template <typename V>
MEGACORE_HD V grad_x(V g, V xhat, V rstd, V mean_g, V mean_gxhat) {
  return (g - mean_g - xhat * mean_gxhat) * rstd;
}

}  // namespace norm
}  // namespace megacore::kernels

MEGACORE_KERNEL(norm_forward, NormForward)
MEGACORE_KERNEL(norm_backward, NormBackward)
