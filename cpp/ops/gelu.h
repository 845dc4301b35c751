#pragma once
// \brief Device-agnostic argument checks of bias_gelu, shared by the CPU and CUDA glue.
#include <string_view>

#include "common/checks.h"

namespace megacore::ops {

/// \brief Checks x/bias/approximate of bias_gelu[_backward]; returns true for the tanh approximation.
inline bool check_bias_gelu(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                            std::string_view approximate) {
  check_float_tensor(op, "x", x);
  check_min_dim(op, "x", x, 1, "[..., hidden]");
  if (bias.has_value()) {
    check_same_dtype_device(op, "bias", *bias, "x", x);
    check_vector(op, "bias", *bias, x.size(-1), "the input's last dim");
  }
  MEGACORE_CHECK_ARG(approximate == "tanh" || approximate == "none", op, "approximate is '", approximate,
                     "', expected 'tanh' or 'none'");
  return approximate == "tanh";
}

}  // namespace megacore::ops
