#pragma once
// \brief Device-agnostic argument checks of bias_dropout_add, shared by the CPU and CUDA glue.
#include "common/checks.h"

namespace megacore::ops {

/// \brief The seed must be an int64 CPU tensor of one element; returns its value (a host read: no sync).
inline int64_t check_seed(const char* op, const at::Tensor& seed) {
  MEGACORE_CHECK_ARG(seed.defined(), op, "seed is undefined");
  MEGACORE_CHECK_TYPE(seed.scalar_type() == at::kLong, op, "seed has dtype ", seed.scalar_type(),
                      ", expected Long (int64)");
  MEGACORE_CHECK_ARG(seed.device().is_cpu(), op, "seed is on ", seed.device(), ", expected a CPU tensor");
  MEGACORE_CHECK_ARG(seed.numel() == 1, op, "seed has ", seed.numel(), " elements, expected 1");
  return *seed.const_data_ptr<int64_t>();
}

/// \brief Checks the arguments of bias_dropout_add; returns the seed.
inline int64_t check_bias_dropout_add(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                      const at::Tensor& residual, double p, const at::Tensor& seed) {
  check_float_tensor(op, "x", x);
  check_min_dim(op, "x", x, 1, "[..., hidden]");
  MEGACORE_CHECK_ARG(residual.defined(), op, "residual is undefined");
  check_same_dtype_device(op, "residual", residual, "x", x);
  check_same_shape(op, "residual", residual, "x", x);
  if (bias.has_value()) {
    check_same_dtype_device(op, "bias", *bias, "x", x);
    check_vector(op, "bias", *bias, x.size(-1), "the input's last dim");
  }
  check_probability(op, "p", p);
  return check_seed(op, seed);
}

/// \brief Checks the arguments of bias_dropout_add_backward; returns the seed.
inline int64_t check_bias_dropout_add_backward(const char* op, const at::Tensor& grad_out, double p,
                                               const at::Tensor& seed) {
  check_float_tensor(op, "grad_out", grad_out);
  check_min_dim(op, "grad_out", grad_out, 1, "[..., hidden]");
  check_probability(op, "p", p);
  return check_seed(op, seed);
}

}  // namespace megacore::ops
