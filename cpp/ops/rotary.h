#pragma once
// \brief Device-agnostic argument checks of apply_rotary_emb, shared by the CPU and CUDA glue.
#include "common/checks.h"

namespace megacore::ops {

/// \brief Checks x ([seq, ..., head_dim]; named `x_name`) and cos/sin ([seq, rotary_dim], float32 or x's
///        dtype); returns rotary_dim.
inline int64_t check_rotary(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
  check_float_tensor(op, x_name, x);
  check_float_tensor(op, "cos", cos);
  check_float_tensor(op, "sin", sin);
  check_min_dim(op, x_name, x, 2, "[seq, ..., head_dim]");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    MEGACORE_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), op, name,
                        " has dtype ", t.scalar_type(), ", expected Float or ", x.scalar_type(), " (the dtype of ",
                        x_name, ")");
    check_same_device(op, name, t, x_name, x);
  }
  MEGACORE_CHECK_ARG(cos.dim() == 2 && cos.size(0) == x.size(0), op, "cos has shape ", shape_str(cos.sizes()),
                     ", expected [", x.size(0), ", rotary_dim] (seq = ", x_name, ".size(0))");
  check_same_shape(op, "sin", sin, "cos", cos);
  const int64_t r = cos.size(1), head_dim = x.size(-1);
  MEGACORE_CHECK_ARG(r > 0 && r % 2 == 0 && r <= head_dim, op, "rotary_dim (cos.size(1)) is ", r,
                     ", expected a positive even number <= head_dim (", head_dim, ")");
  return r;
}

}  // namespace megacore::ops
