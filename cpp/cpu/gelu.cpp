// CPU glue of bias_gelu: checks, contiguity, allocation, then the kernel of the active ISA.
#include "cpu/gelu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/tensors.h"
#include "ops/gelu.h"

namespace megacore::cpu {
namespace {

at::Tensor bias_gelu(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  const bool tanh = ops::check_bias_gelu("bias_gelu", x, bias, approximate);
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty_like(xc);
  bias_gelu_forward_kernel()(xc, bc, out, tanh);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::string_view approximate) {
  const bool tanh = ops::check_bias_gelu("bias_gelu_backward", x, bias, approximate);
  check_same_dtype_device("bias_gelu_backward", "grad_out", grad_out, "x", x);
  check_same_shape("bias_gelu_backward", "grad_out", grad_out, "x", x);
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const at::Tensor bc = contiguous_or_undefined(bias);
  at::Tensor grad_x = at::empty_like(xc);
  const at::Tensor grad_bias_acc = empty_param_grad_acc(x, bias.has_value());
  bias_gelu_backward_kernel()(gc, xc, bc, grad_x, grad_bias_acc, tanh);
  return {grad_x, finish_param_grad(grad_bias_acc, x)};
}

}  // namespace
}  // namespace megacore::cpu

TORCH_LIBRARY_IMPL(megacore, CPU, m) {
  m.impl("bias_gelu", &megacore::cpu::bias_gelu);
  m.impl("bias_gelu_backward", &megacore::cpu::bias_gelu_backward);
}
