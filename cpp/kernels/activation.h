#pragma once
// \brief The activation kernels (kernels/cpu/activation.cpp, kernels/cuda/activation.cu) and the activation
//        functions both compute: bias + activation (bias_gelu, bias_relu) and the gated linear units
//        (bias_gated: GeGLU, SwiGLU, ReGLU), forward and backward with the bias gradient fused in.
//        Tensors are contiguous, of `dtype`, with rows over everything but the last dim; bias is null when
//        absent. Math in fp32 (fp64 for fp64), one rounding on store.
#include "kernels/common.h"

namespace megacore::kernels {

/// \brief The activation a kernel applies. Kernels are compiled once per value
///        (MEGACORE_DISPATCH_ACTIVATION), so the choice costs nothing per element.
enum class Activation : int {
  kGeluTanh = 0,  // x * 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GPT-2's gelu_new, T5 v1.1's GeGLU
  kGeluErf = 1,   // x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))
  kSilu = 2,      // x * sigmoid(x), LLaMA's SwiGLU
  kRelu = 3,      // max(x, 0); its gradient at 0 is 0, as torch's
};

/// out = act(x + bias); x/out [rows, cols], bias [cols]. Ops: bias_gelu (either GeLU) and bias_relu, the names
/// of the CUDA launchers' NVTX ranges.
struct BiasActivationForward {
  const void* x;
  const void* bias;  // may be null
  void* out;
  int64_t rows, cols;
  DType dtype;
  Activation activation;
};

/// grad_x = grad_out * act'(x + bias); grad_bias = column sums of grad_x.
struct BiasActivationBackward {
  const void* grad_out;
  const void* x;
  const void* bias;  // may be null
  void* grad_x;
  void* grad_bias;  // [cols] of dtype; null when not wanted
  void* workspace;  // CUDA, when grad_bias: [column_partial_rows(rows), cols] of the accumulation type
  int64_t rows, cols;
  DType dtype;
  Activation activation;
};

/// A gated linear unit: out = act(gate) * linear, where x [rows, 2 cols] holds the gate half in its first
/// cols columns and the linear half in the last (Megatron's and Hugging Face's order), each plus its half
/// of bias [2 cols]. out is [rows, cols].
struct BiasGatedForward {
  const void* x;
  const void* bias;  // may be null
  void* out;
  int64_t rows, cols;  // cols: the output's width, half of x's
  DType dtype;
  Activation activation;
};

/// grad_gate = grad_out * linear * act'(gate), grad_linear = grad_out * act(gate), side by side in
/// grad_x [rows, 2 cols] as in x; grad_bias [2 cols] = column sums of grad_x.
struct BiasGatedBackward {
  const void* grad_out;  // [rows, cols]
  const void* x;         // [rows, 2 cols]
  const void* bias;      // [2 cols]; may be null
  void* grad_x;          // [rows, 2 cols]
  void* grad_bias;       // [2 cols] of dtype; null when not wanted
  void* workspace;       // CUDA, when grad_bias: [column_partial_rows(rows), 2 cols] of the accumulation type
  int64_t rows, cols;
  DType dtype;
  Activation activation;
};

/// Runs the statement list with `A` a constexpr kernels::Activation equal to `activation`; `otherwise` runs
/// for a value outside the enum. The kernels are templates over A.
#define MEGACORE_DISPATCH_ACTIVATION(activation, A, otherwise, ...)  \
  switch (activation) {                                            \
    case ::megacore::kernels::Activation::kGeluTanh: {             \
      constexpr auto A = ::megacore::kernels::Activation::kGeluTanh; \
      __VA_ARGS__;                                                 \
      break;                                                       \
    }                                                              \
    case ::megacore::kernels::Activation::kGeluErf: {              \
      constexpr auto A = ::megacore::kernels::Activation::kGeluErf; \
      __VA_ARGS__;                                                 \
      break;                                                       \
    }                                                              \
    case ::megacore::kernels::Activation::kSilu: {                 \
      constexpr auto A = ::megacore::kernels::Activation::kSilu;   \
      __VA_ARGS__;                                                 \
      break;                                                       \
    }                                                              \
    case ::megacore::kernels::Activation::kRelu: {                 \
      constexpr auto A = ::megacore::kernels::Activation::kRelu;   \
      __VA_ARGS__;                                                 \
      break;                                                       \
    }                                                              \
    default:                                                       \
      otherwise;                                                   \
  }

namespace activation {

constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kCoeff = 0.044715;
constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

/// 1 / (1 + exp(-x)), with the fast exp: one exp and one division (about twice as fast as a vector tanh
/// on CPU). Saturates to 0 and 1 without NaN: exp overflows to inf (or, on CPU, clamps to FLT_MAX).
template <typename V>
MEGACORE_HD V sigmoid(V x) {
  return splat<V>(1) / (splat<V>(1) + Math<V>::fast_exp(splat<V>(0) - x));
}

/// sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): 0.5 (1 + tanh(u)), the tanh GeLU's factor.
template <typename V>
MEGACORE_HD V sigmoid_2u(V x) {
  return sigmoid(splat<V>(2 * kSqrt2OverPi) * (x + splat<V>(kCoeff) * x * x * x));
}

/// Phi(x) = 0.5 (1 + erf(x / sqrt 2)), the erf GeLU's factor.
template <typename V>
MEGACORE_HD V normal_cdf(V x) {
  return splat<V>(0.5) * (splat<V>(1) + Math<V>::erf(x * splat<V>(kInvSqrt2)));
}

/// act(x).
template <Activation A, typename V>
MEGACORE_HD V forward(V x) {
  if constexpr (A == Activation::kGeluTanh) {
    return x * sigmoid_2u(x);
  } else if constexpr (A == Activation::kGeluErf) {
    return x * normal_cdf(x);
  } else if constexpr (A == Activation::kSilu) {
    return x * sigmoid(x);
  } else {
    return Math<V>::relu(x);
  }
}

template <typename V>
struct ValueGrad {
  V value, grad;
};

/// act(x) and act'(x), sharing their transcendental functions (what the gated backward needs):
///   tanh GeLU: s + 2 x s (1 - s) du/dx with s = sigmoid(2u);   erf GeLU: Phi(x) + x phi(x);
///   SiLU: s (1 + x (1 - s)) with s = sigmoid(x);                ReLU: 1 where x > 0, else 0.
template <Activation A, typename V>
MEGACORE_HD ValueGrad<V> value_and_grad(V x) {
  const V one = splat<V>(1);
  if constexpr (A == Activation::kGeluTanh) {
    const V s = sigmoid_2u(x);
    const V du = splat<V>(kSqrt2OverPi) * (one + splat<V>(3 * kCoeff) * x * x);
    return {x * s, s + splat<V>(2) * x * s * (one - s) * du};
  } else if constexpr (A == Activation::kGeluErf) {
    const V cdf = normal_cdf(x);
    return {x * cdf, cdf + x * Math<V>::exp(splat<V>(-0.5) * x * x) * splat<V>(kInvSqrt2Pi)};
  } else if constexpr (A == Activation::kSilu) {
    const V s = sigmoid(x);
    return {x * s, s * (one + x * (one - s))};
  } else {
    return {Math<V>::relu(x), Math<V>::relu_grad(x)};
  }
}

/// act'(x) (the value's one multiply left to the compiler to drop).
template <Activation A, typename V>
MEGACORE_HD V grad(V x) {
  return value_and_grad<A>(x).grad;
}

}  // namespace activation
}  // namespace megacore::kernels

MEGACORE_KERNEL(bias_activation_forward, BiasActivationForward)
MEGACORE_KERNEL(bias_activation_backward, BiasActivationBackward)
MEGACORE_KERNEL(bias_gated_forward, BiasGatedForward)
MEGACORE_KERNEL(bias_gated_backward, BiasGatedBackward)
