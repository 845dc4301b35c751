// The activation family: bias + activation (bias_gelu, bias_relu) and the gated linear units (bias_gated:
// GeGLU, SwiGLU, ReGLU), each with its backward, the bias gradient fused in. Schemas, argument checks,
// allocation, and the CPU and CUDA registrations; the kernels are kernels/activation.h's.
#include "kernels/activation.h"

#include <array>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ops/op.h"

namespace megacore::ops {
namespace {

using kernels::Activation;

/// bias_gated's activations by name: the GLU variants of Shazeer, "GLU Variants Improve Transformer" (2020).
constexpr std::array<std::pair<std::string_view, Activation>, 4> kGatedActivations{{
    {"geglu", Activation::kGeluTanh},  // T5 v1.1 (gelu_new)
    {"geglu_erf", Activation::kGeluErf},
    {"swiglu", Activation::kSilu},  // LLaMA
    {"reglu", Activation::kRelu},
}};

/// \brief Checks x ([..., hidden], a float dtype) and bias ([hidden] of x's dtype, or None).
void check_x_and_bias(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                      const char* layout) {
  check_float_tensor(op, "x", x);
  check_min_dim(op, "x", x, 1, layout);
  if (bias.has_value()) {
    check_same_dtype_device(op, "bias", *bias, "x", x);
    check_vector(op, "bias", *bias, x.size(-1), "the input's last dim");
  }
}

/// \brief bias_gelu's activation from its `approximate`.
Activation gelu_activation(const char* op, std::string_view approximate) {
  MEGACORE_CHECK_ARG(approximate == "tanh" || approximate == "none", op, "approximate is '", approximate,
                     "', expected 'tanh' or 'none'");
  return approximate == "tanh" ? Activation::kGeluTanh : Activation::kGeluErf;
}

/// \brief Checks bias_gated's x (an even last dim), bias and activation name; returns the activation.
Activation check_bias_gated(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                            std::string_view activation) {
  check_x_and_bias(op, x, bias, "[..., 2n], the gate half then the linear half");
  MEGACORE_CHECK_ARG(x.size(-1) % 2 == 0, op, "x has shape ", shape_str(x.sizes()), ", expected an even last dim ",
                     "([..., 2n], the gate half then the linear half)");
  std::string names;
  for (const auto& [name, value] : kGatedActivations) {
    if (name == activation) return value;
    names += (names.empty() ? "'" : ", '") + std::string(name) + "'";
  }
  MEGACORE_CHECK_ARG(false, op, "activation is '", activation, "', expected one of ", names);
  return Activation::kSilu;  // not reached
}

// ---- bias + activation: bias_gelu, bias_relu -----------------------------------------------------------

at::Tensor bias_activation(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias,
                           Activation activation) {
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous(), bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty_like(xc);
  const kernels::BiasActivationForward p{xc.const_data_ptr(), ptr_or_null(bc), out.mutable_data_ptr(), rows_of(x),
                                         x.size(-1), dtype_of(x), activation};
  MEGACORE_LAUNCH(op, bias_activation_forward, x, p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_activation_backward(const char* op, const at::Tensor& grad_out,
                                                            const at::Tensor& x,
                                                            const std::optional<at::Tensor>& bias,
                                                            Activation activation) {
  check_same_dtype_device(op, "grad_out", grad_out, "x", x);
  check_same_shape(op, "grad_out", grad_out, "x", x);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous(), bc = contiguous_or_undefined(bias);
  const int64_t rows = rows_of(x), cols = x.size(-1);
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_bias = empty_param_grad(x, bias.has_value(), rows);
  const at::Tensor workspace = column_workspace(x, bias.has_value(), 1, rows, cols);
  const kernels::BiasActivationBackward p{gc.const_data_ptr(), xc.const_data_ptr(), ptr_or_null(bc),
                                          grad_x.mutable_data_ptr(),
                                          bias.has_value() ? grad_bias.mutable_data_ptr() : nullptr,
                                          mutable_ptr_or_null(workspace), rows, cols, dtype_of(x), activation};
  MEGACORE_LAUNCH(op, bias_activation_backward, x, p);
  return {grad_x, grad_bias};
}

at::Tensor bias_gelu(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  check_x_and_bias("bias_gelu", x, bias, "[..., hidden]");
  return bias_activation("bias_gelu", x, bias, gelu_activation("bias_gelu", approximate));
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::string_view approximate) {
  const char* op = "bias_gelu_backward";
  check_x_and_bias(op, x, bias, "[..., hidden]");
  return bias_activation_backward(op, grad_out, x, bias, gelu_activation(op, approximate));
}

at::Tensor bias_relu(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  check_x_and_bias("bias_relu", x, bias, "[..., hidden]");
  return bias_activation("bias_relu", x, bias, Activation::kRelu);
}

std::tuple<at::Tensor, at::Tensor> bias_relu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& bias) {
  check_x_and_bias("bias_relu_backward", x, bias, "[..., hidden]");
  return bias_activation_backward("bias_relu_backward", grad_out, x, bias, Activation::kRelu);
}

// ---- gated linear units: bias_gated ----------------------------------------------------------------------

/// x's shape with the last dim halved: the gated output's.
std::vector<int64_t> gated_shape(const at::Tensor& x) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() /= 2;
  return shape;
}

at::Tensor bias_gated(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const Activation act = check_bias_gated("bias_gated", x, bias, activation);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous(), bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty(gated_shape(x), xc.options());  // [..., n]
  const kernels::BiasGatedForward p{xc.const_data_ptr(), ptr_or_null(bc), out.mutable_data_ptr(), rows_of(x),
                                    x.size(-1) / 2, dtype_of(x), act};
  MEGACORE_LAUNCH("bias_gated", bias_gated_forward, x, p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gated_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const std::optional<at::Tensor>& bias,
                                                       c10::string_view activation) {
  const char* op = "bias_gated_backward";
  const Activation act = check_bias_gated(op, x, bias, activation);
  check_same_dtype_device(op, "grad_out", grad_out, "x", x);
  const std::vector<int64_t> out_shape = gated_shape(x);
  MEGACORE_CHECK_ARG(grad_out.sizes() == at::IntArrayRef(out_shape), op, "grad_out has shape ",
                     shape_str(grad_out.sizes()), ", expected ", shape_str(out_shape),
                     " (the shape of x with its last dim halved)");
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous(), bc = contiguous_or_undefined(bias);
  const int64_t rows = rows_of(x), cols = x.size(-1);  // cols = 2n, x's and the bias's
  at::Tensor grad_x = at::empty_like(xc);               // [..., 2n]
  at::Tensor grad_bias = empty_param_grad(x, bias.has_value(), rows);
  const at::Tensor workspace = column_workspace(x, bias.has_value(), 1, rows, cols);
  const kernels::BiasGatedBackward p{gc.const_data_ptr(), xc.const_data_ptr(), ptr_or_null(bc),
                                     grad_x.mutable_data_ptr(),
                                     bias.has_value() ? grad_bias.mutable_data_ptr() : nullptr,
                                     mutable_ptr_or_null(workspace), rows, cols / 2, dtype_of(x), act};
  MEGACORE_LAUNCH(op, bias_gated_backward, x, p);
  return {grad_x, grad_bias};
}

void register_kernels(torch::Library& m) {
  m.impl("bias_gelu", &bias_gelu);
  m.impl("bias_gelu_backward", &bias_gelu_backward);
  m.impl("bias_relu", &bias_relu);
  m.impl("bias_relu_backward", &bias_relu_backward);
  m.impl("bias_gated", &bias_gated);
  m.impl("bias_gated_backward", &bias_gated_backward);
}

}  // namespace
}  // namespace megacore::ops

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  // gelu(x + bias): x [..., hidden], bias [hidden] or None; approximate 'tanh' or 'none' (erf).
  megacore::ops::define_op(m, "bias_gelu(Tensor x, Tensor? bias, str approximate='tanh') -> Tensor");
  // -> (grad_x, grad_bias); grad_bias is empty ([0]) when bias is None.
  megacore::ops::define_op(
      m, "bias_gelu_backward(Tensor grad_out, Tensor x, Tensor? bias, str approximate) -> (Tensor, Tensor)");
  // relu(x + bias), as bias_gelu.
  megacore::ops::define_op(m, "bias_relu(Tensor x, Tensor? bias) -> Tensor");
  // -> (grad_x, grad_bias); grad_bias is empty ([0]) when bias is None.
  megacore::ops::define_op(m, "bias_relu_backward(Tensor grad_out, Tensor x, Tensor? bias) -> (Tensor, Tensor)");
  // act(x1 + b1) * (x2 + b2): x [..., 2n] = [gate x1 | linear x2], bias [2n] or None -> [..., n];
  // activation 'geglu' (tanh GeLU), 'geglu_erf', 'swiglu' (SiLU) or 'reglu'.
  megacore::ops::define_op(m, "bias_gated(Tensor x, Tensor? bias, str activation) -> Tensor");
  // grad_out [..., n] -> (grad_x [..., 2n], grad_bias [2n]); grad_bias is empty ([0]) when bias is None.
  megacore::ops::define_op(
      m, "bias_gated_backward(Tensor grad_out, Tensor x, Tensor? bias, str activation) -> (Tensor, Tensor)");
}

MEGACORE_REGISTER_KERNELS(megacore::ops::register_kernels)
