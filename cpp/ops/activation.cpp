// The activation family (so far bias_gelu): y = gelu(x + bias), bias over the last dim, and its backward.
// Schemas, argument checks, allocation, and the CPU and CUDA registrations; the kernels are
// kernels/activation.h's.
#include "kernels/activation.h"

#include <string_view>

#include "ops/op.h"

namespace megacore::ops {
namespace {

/// \brief Checks x/bias/approximate; returns true for the tanh approximation.
bool check_bias_gelu(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
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

at::Tensor bias_gelu(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  const bool tanh = check_bias_gelu("bias_gelu", x, bias, approximate);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous(), bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty_like(xc);
  const kernels::BiasGeluForward p{xc.const_data_ptr(), ptr_or_null(bc), out.mutable_data_ptr(), rows_of(x),
                                   x.size(-1), dtype_of(x), tanh};
  MEGACORE_LAUNCH("bias_gelu", bias_gelu_forward, x, p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::string_view approximate) {
  const bool tanh = check_bias_gelu("bias_gelu_backward", x, bias, approximate);
  check_same_dtype_device("bias_gelu_backward", "grad_out", grad_out, "x", x);
  check_same_shape("bias_gelu_backward", "grad_out", grad_out, "x", x);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous(), bc = contiguous_or_undefined(bias);
  const int64_t rows = rows_of(x), cols = x.size(-1);
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_bias = empty_param_grad(x, bias.has_value(), rows);
  const at::Tensor workspace = column_workspace(x, bias.has_value(), 1, rows, cols);
  const kernels::BiasGeluBackward p{gc.const_data_ptr(), xc.const_data_ptr(), ptr_or_null(bc), grad_x.mutable_data_ptr(),
                                    bias.has_value() ? grad_bias.mutable_data_ptr() : nullptr,
                                    mutable_ptr_or_null(workspace), rows, cols, dtype_of(x), tanh};
  MEGACORE_LAUNCH("bias_gelu_backward", bias_gelu_backward, x, p);
  return {grad_x, grad_bias};
}

void register_kernels(torch::Library& m) {
  m.impl("bias_gelu", &bias_gelu);
  m.impl("bias_gelu_backward", &bias_gelu_backward);
}

}  // namespace
}  // namespace megacore::ops

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  megacore::ops::define_op(m, "bias_gelu(Tensor x, Tensor? bias, str approximate='tanh') -> Tensor");
  // -> (grad_x, grad_bias); grad_bias is empty ([0]) when bias is None.
  megacore::ops::define_op(
      m, "bias_gelu_backward(Tensor grad_out, Tensor x, Tensor? bias, str approximate) -> (Tensor, Tensor)");
}

MEGACORE_REGISTER_KERNELS(megacore::ops::register_kernels)
