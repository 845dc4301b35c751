// The bias_dropout_add family: out = residual + dropout(x + bias), bias over the last dim, and its backward.
// The keep mask is a function of (seed, element index) (kernels/dropout.h), so the backward redraws it
// instead of storing it. Schemas, argument checks, allocation, and the CPU and CUDA registrations; the
// kernels are kernels/dropout.h's.
#include "kernels/dropout.h"

#include "ops/op.h"

namespace megacore::ops {
namespace {

/// \brief The seed must be an int64 CPU tensor of one element; returns its value (a host read: no sync).
int64_t check_seed(const char* op, const at::Tensor& seed) {
  MEGACORE_CHECK_ARG(seed.defined(), op, "seed is undefined");
  MEGACORE_CHECK_TYPE(seed.scalar_type() == at::kLong, op, "seed has dtype ", seed.scalar_type(),
                      ", expected Long (int64)");
  MEGACORE_CHECK_ARG(seed.device().is_cpu(), op, "seed is on ", seed.device(), ", expected a CPU tensor");
  MEGACORE_CHECK_ARG(seed.numel() == 1, op, "seed has ", seed.numel(), " elements, expected 1");
  return *seed.const_data_ptr<int64_t>();
}

/// \brief Checks the arguments of bias_dropout_add; returns the seed.
int64_t check_bias_dropout_add(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
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
int64_t check_bias_dropout_add_backward(const char* op, const at::Tensor& grad_out, double p,
                                        const at::Tensor& seed) {
  check_float_tensor(op, "grad_out", grad_out);
  check_min_dim(op, "grad_out", grad_out, 1, "[..., hidden]");
  check_probability(op, "p", p);
  return check_seed(op, seed);
}

at::Tensor bias_dropout_add(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                            double p, const at::Tensor& seed) {
  const int64_t s = check_bias_dropout_add("bias_dropout_add", x, bias, residual, p, seed);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty_like(xc);
  const kernels::BiasDropoutAddForward params{xc.const_data_ptr(), ptr_or_null(bc), rc.const_data_ptr(),
                                              out.mutable_data_ptr(), rows_of(x), x.size(-1), dtype_of(x), p, s};
  MEGACORE_LAUNCH("bias_dropout_add", bias_dropout_add_forward, x, params);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad_out, double p,
                                                             const at::Tensor& seed, bool has_bias) {
  const int64_t s = check_bias_dropout_add_backward("bias_dropout_add_backward", grad_out, p, seed);
  const at::OptionalDeviceGuard guard(at::device_of(grad_out));
  const at::Tensor gc = grad_out.contiguous();
  const int64_t rows = rows_of(gc), cols = gc.size(-1);
  at::Tensor grad_x = at::empty_like(gc);
  at::Tensor grad_bias = empty_param_grad(gc, has_bias, rows);
  const at::Tensor workspace = column_workspace(gc, has_bias, 1, rows, cols);
  const kernels::BiasDropoutAddBackward params{gc.const_data_ptr(), grad_x.mutable_data_ptr(),
                                               has_bias ? grad_bias.mutable_data_ptr() : nullptr,
                                               mutable_ptr_or_null(workspace), rows, cols, dtype_of(gc), p, s};
  MEGACORE_LAUNCH("bias_dropout_add_backward", bias_dropout_add_backward, gc, params);
  return {grad_x, grad_bias};
}

void register_kernels(torch::Library& m) {
  m.impl("bias_dropout_add", &bias_dropout_add);
  m.impl("bias_dropout_add_backward", &bias_dropout_add_backward);
}

}  // namespace
}  // namespace megacore::ops

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  // ---- residual + dropout(x + bias); the keep mask is a function of (seed, element index) ------------
  // seed: int64 CPU tensor of one element.
  megacore::ops::define_op(m, "bias_dropout_add(Tensor x, Tensor? bias, Tensor residual, float p, Tensor seed) -> Tensor");
  // -> (grad_x, grad_bias); grad_x = grad_out * mask / (1 - p), grad_bias = grad_x summed over rows
  //    (empty when has_bias is false). The residual's gradient is grad_out itself.
  megacore::ops::define_op(m, "bias_dropout_add_backward(Tensor grad_out, float p, Tensor seed, bool has_bias) -> (Tensor, Tensor)");
}

MEGACORE_REGISTER_KERNELS(megacore::ops::register_kernels)
