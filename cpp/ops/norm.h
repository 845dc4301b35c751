#pragma once
// \brief Device-agnostic argument checks of layer_norm / rms_norm and their backward ops, shared by the
//        CPU and CUDA glue.
#include <ATen/OpMathType.h>

#include <cmath>
#include <optional>

#include "common/checks.h"

namespace megacore::ops {

/// \brief Checks x ([..., hidden], rank >= 1), an optional [hidden] parameter of x's dtype and device.
inline void check_norm_input(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias) {
  check_float_tensor(op, "x", x);
  check_min_dim(op, "x", x, 1, "[..., hidden]");
  for (const auto& [name, p] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
    if (!p->has_value()) continue;
    check_same_dtype_device(op, name, **p, "x", x);
    check_vector(op, name, **p, x.size(-1), "the input's last dim");
  }
}

/// \brief eps must be a finite number >= 0 (NaN is rejected too).
inline void check_eps(const char* op, double eps) {
  MEGACORE_CHECK_ARG(eps >= 0.0 && std::isfinite(eps), op, "eps is ", eps, ", expected a finite value >= 0");
}

/// \brief A saved statistic (mean or rstd): x.shape[:-1] in fp32 (fp64 for fp64 x), on x's device.
inline void check_norm_stat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const auto acc = at::toOpMathType(x.scalar_type());
  MEGACORE_CHECK_ARG(t.defined(), op, name, " is undefined");
  MEGACORE_CHECK_TYPE(t.scalar_type() == acc, op, name, " has dtype ", t.scalar_type(), ", expected ", acc,
                      " (the statistics dtype of x)");
  check_same_device(op, name, t, "x", x);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  MEGACORE_CHECK_ARG(t.sizes() == lead, op, name, " has shape ", shape_str(t.sizes()), ", expected ",
                     shape_str(lead), " (x's shape without its last dim)");
}

/// \brief Checks of a norm backward: x/weight as in the forward, grad_out like x, the saved statistics.
inline void check_norm_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                                const std::optional<at::Tensor>& weight, const at::Tensor* mean,
                                const at::Tensor& rstd) {
  check_norm_input(op, x, weight, std::nullopt);
  check_float_tensor(op, "grad_out", grad_out);
  check_same_dtype_device(op, "grad_out", grad_out, "x", x);
  check_same_shape(op, "grad_out", grad_out, "x", x);
  if (mean) check_norm_stat(op, "mean", *mean, x);
  check_norm_stat(op, "rstd", rstd, x);
}

}  // namespace megacore::ops
