// The norm family: layer_norm / rms_norm over the last dim and their backward ops. Schemas, argument
// checks, allocation, and the CPU and CUDA registrations; the kernels are kernels/norm.h's.
#include "kernels/norm.h"

#include <cmath>

#include "ops/op.h"

namespace megacore::ops {
namespace {

/// \brief Checks x ([..., hidden], rank >= 1), an optional [hidden] parameter of x's dtype and device.
void check_norm_input(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
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
void check_eps(const char* op, double eps) {
  MEGACORE_CHECK_ARG(eps >= 0.0 && std::isfinite(eps), op, "eps is ", eps, ", expected a finite value >= 0");
}

/// \brief A saved statistic (mean or rstd): x.shape[:-1] in fp32 (fp64 for fp64 x), on x's device.
void check_norm_stat(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  const auto acc = acc_dtype(x);
  MEGACORE_CHECK_ARG(t.defined(), op, name, " is undefined");
  MEGACORE_CHECK_TYPE(t.scalar_type() == acc, op, name, " has dtype ", t.scalar_type(), ", expected ", acc,
                      " (the statistics dtype of x)");
  check_same_device(op, name, t, "x", x);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  MEGACORE_CHECK_ARG(t.sizes() == lead, op, name, " has shape ", shape_str(t.sizes()), ", expected ",
                     shape_str(lead), " (x's shape without its last dim)");
}

/// \brief Checks of a norm backward: x/weight as in the forward, grad_out like x, the saved statistics.
void check_norm_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& x,
                         const std::optional<at::Tensor>& weight, const at::Tensor* mean, const at::Tensor& rstd) {
  check_norm_input(op, x, weight, std::nullopt);
  check_float_tensor(op, "grad_out", grad_out);
  check_same_dtype_device(op, "grad_out", grad_out, "x", x);
  check_same_shape(op, "grad_out", grad_out, "x", x);
  if (mean) check_norm_stat(op, "mean", *mean, x);
  check_norm_stat(op, "rstd", rstd, x);
}

/// \brief Runs norm_forward for layer_norm (mean wanted) or rms_norm (no mean, no bias): returns (out,
///        mean or undefined, rstd).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const char* op, const at::Tensor& x,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& bias, bool with_mean,
                                                            double eps) {
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous(), wc = contiguous_or_undefined(weight), bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty_like(xc), rstd = empty_row_stats(x);
  at::Tensor mean = with_mean ? empty_row_stats(x) : at::Tensor();
  const kernels::NormForward p{xc.const_data_ptr(), ptr_or_null(wc), ptr_or_null(bc), out.mutable_data_ptr(),
                               mutable_ptr_or_null(mean), rstd.mutable_data_ptr(), rows_of(x), x.size(-1), eps,
                               dtype_of(x)};
  MEGACORE_LAUNCH(op, norm_forward, x, p);
  return {out, mean, rstd};
}

/// \brief Shared by both backward ops (an undefined mean selects RMSNorm): grad_x, and the parameter
///        gradients ([cols] of x's dtype, or [0] when not wanted), from one launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(const char* op, const at::Tensor& grad_out,
                                                             const at::Tensor& x,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& mean, const at::Tensor& rstd,
                                                             bool has_bias) {
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous(), wc = contiguous_or_undefined(weight);
  const at::Tensor mc = mean.defined() ? mean.contiguous() : at::Tensor(), rc = rstd.contiguous();
  const int64_t rows = rows_of(x), cols = x.size(-1);
  const bool has_weight = weight.has_value();
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_weight = empty_param_grad(x, has_weight, rows), grad_bias = empty_param_grad(x, has_bias, rows);
  const at::Tensor workspace = column_workspace(x, has_weight || has_bias, 2, rows, cols);
  const kernels::NormBackward p{gc.const_data_ptr(), xc.const_data_ptr(), ptr_or_null(wc), ptr_or_null(mc),
                                rc.const_data_ptr(), grad_x.mutable_data_ptr(),
                                has_weight ? grad_weight.mutable_data_ptr() : nullptr,
                                has_bias ? grad_bias.mutable_data_ptr() : nullptr, mutable_ptr_or_null(workspace),
                                rows, cols, dtype_of(x)};
  MEGACORE_LAUNCH(op, norm_backward, x, p);
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double eps) {
  check_norm_input("layer_norm", x, weight, bias);
  check_eps("layer_norm", eps);
  return norm_forward("layer_norm", x, weight, bias, true, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool has_bias) {
  check_norm_backward("layer_norm_backward", grad_out, x, weight, &mean, rstd);
  return norm_backward("layer_norm_backward", grad_out, x, weight, mean, rstd, has_bias);
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  check_norm_input("rms_norm", x, weight, std::nullopt);
  check_eps("rms_norm", eps);
  auto [out, mean, rstd] = norm_forward("rms_norm", x, weight, std::nullopt, false, eps);
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  check_norm_backward("rms_norm_backward", grad_out, x, weight, nullptr, rstd);
  auto [grad_x, grad_weight, grad_bias] =
      norm_backward("rms_norm_backward", grad_out, x, weight, at::Tensor(), rstd, false);
  return {grad_x, grad_weight};
}

void register_kernels(torch::Library& m) {
  m.impl("layer_norm", &layer_norm);
  m.impl("layer_norm_backward", &layer_norm_backward);
  m.impl("rms_norm", &rms_norm);
  m.impl("rms_norm_backward", &rms_norm_backward);
}

}  // namespace
}  // namespace megacore::ops

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  // ---- normalization over the last dim, statistics in fp32 (fp64 for fp64 input) ---------------------
  // -> (out, mean, rstd); mean and rstd have the input's leading shape.
  megacore::ops::define_op(m, "layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_weight, grad_bias); grad_weight/grad_bias empty when weight/bias is None.
  megacore::ops::define_op(m,
      "layer_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias)"
      " -> (Tensor, Tensor, Tensor)");
  // -> (out, rstd)
  megacore::ops::define_op(m, "rms_norm(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  // -> (grad_x, grad_weight); grad_weight empty when weight is None.
  megacore::ops::define_op(m, "rms_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
}

MEGACORE_REGISTER_KERNELS(megacore::ops::register_kernels)
