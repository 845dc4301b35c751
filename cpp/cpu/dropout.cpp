// CPU glue of bias_dropout_add: checks, contiguity, allocation, then the kernel of the active ISA.
#include "cpu/dropout.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/tensors.h"
#include "ops/dropout.h"

namespace megacore::cpu {
namespace {

at::Tensor bias_dropout_add(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                            double p, const at::Tensor& seed) {
  const int64_t s = ops::check_bias_dropout_add("bias_dropout_add", x, bias, residual, p, seed);
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  const at::Tensor bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty_like(xc);
  bias_dropout_add_forward_kernel()(xc, bc, rc, out, p, s);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad_out, double p,
                                                             const at::Tensor& seed, bool has_bias) {
  const int64_t s = ops::check_bias_dropout_add_backward("bias_dropout_add_backward", grad_out, p, seed);
  const at::Tensor gc = grad_out.contiguous();
  at::Tensor grad_x = at::empty_like(gc);
  const at::Tensor grad_bias_acc = empty_param_grad_acc(gc, has_bias);
  bias_dropout_add_backward_kernel()(gc, grad_x, grad_bias_acc, p, s);
  return {grad_x, finish_param_grad(grad_bias_acc, gc)};
}

}  // namespace
}  // namespace megacore::cpu

TORCH_LIBRARY_IMPL(megacore, CPU, m) {
  m.impl("bias_dropout_add", &megacore::cpu::bias_dropout_add);
  m.impl("bias_dropout_add_backward", &megacore::cpu::bias_dropout_add_backward);
}
