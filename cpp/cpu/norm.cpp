// CPU glue of layer_norm / rms_norm: checks, contiguity, allocation, then the kernel of the active ISA.
#include "cpu/norm.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "ops/norm.h"
#include "common/tensors.h"

namespace megacore::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double eps) {
  ops::check_norm_input("layer_norm", x, weight, bias);
  ops::check_eps("layer_norm", eps);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc), mean = empty_row_stats(x), rstd = empty_row_stats(x);
  norm_forward_kernel()(xc, contiguous_or_undefined(weight), contiguous_or_undefined(bias), out, mean, rstd, eps);
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool has_bias) {
  ops::check_norm_backward("layer_norm_backward", grad_out, x, weight, &mean, rstd);
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  const at::Tensor gw = empty_param_grad_acc(x, weight.has_value()), gb = empty_param_grad_acc(x, has_bias);
  norm_backward_kernel()(gc, xc, contiguous_or_undefined(weight), mean.contiguous(), rstd.contiguous(), grad_x, gw,
                         gb);
  return {grad_x, finish_param_grad(gw, x), finish_param_grad(gb, x)};
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  ops::check_norm_input("rms_norm", x, weight, std::nullopt);
  ops::check_eps("rms_norm", eps);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc), rstd = empty_row_stats(x);
  norm_forward_kernel()(xc, contiguous_or_undefined(weight), at::Tensor(), out, at::Tensor(), rstd, eps);
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  ops::check_norm_backward("rms_norm_backward", grad_out, x, weight, nullptr, rstd);
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  const at::Tensor gw = empty_param_grad_acc(x, weight.has_value());
  norm_backward_kernel()(gc, xc, contiguous_or_undefined(weight), at::Tensor(), rstd.contiguous(), grad_x, gw,
                         at::Tensor());
  return {grad_x, finish_param_grad(gw, x)};
}

}  // namespace
}  // namespace megacore::cpu

TORCH_LIBRARY_IMPL(megacore, CPU, m) {
  m.impl("layer_norm", &megacore::cpu::layer_norm);
  m.impl("layer_norm_backward", &megacore::cpu::layer_norm_backward);
  m.impl("rms_norm", &megacore::cpu::rms_norm);
  m.impl("rms_norm_backward", &megacore::cpu::rms_norm_backward);
}
