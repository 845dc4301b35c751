#pragma once
// What the transformer layer is built from: megacore's fused ops called through the dispatcher (so the CPU or
// CUDA kernel is picked by device), the tensor-parallel regions (Megatron's f/g conjugate pairs) on megacore's
// C++ collectives, and GEMM helpers on [s, b, in] activations.
#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <tuple>

#include "transformer/config.h"

namespace megacore::transformer {

using OptT = std::optional<at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

/// \brief A [0] tensor with like's options: the value of an unused slot or an absent gradient.
at::Tensor nothing(const at::Tensor& like);

// ---- fused ops -------------------------------------------------------------------------------------------
/// \brief The norm's output and its statistics (mean is a [0] tensor for rmsnorm).
T3 norm_forward(const Config& c, const at::Tensor& x, const OptT& w, const OptT& b);
/// \brief -> (grad_x, grad_weight, grad_bias), the parameter gradients undefined when absent.
T3 norm_backward(const Config& c, const at::Tensor& g, const at::Tensor& x, const OptT& w, const OptT& b,
                 const at::Tensor& mean, const at::Tensor& rstd);
/// \brief residual + dropout(x + bias), the dropout mask drawn from `seed` (one Philox stream per site).
at::Tensor bias_dropout_add(const at::Tensor& x, const OptT& bias, const at::Tensor& residual, double p, int64_t seed);
/// \brief -> (grad_x, grad_bias or undefined).
T2 bias_dropout_add_backward(const at::Tensor& g, double p, int64_t seed, bool has_bias);
/// \brief The MLP's activation of fc1's output x [..., f] (gated: [..., 2f] = [gate; up] -> [..., f]).
at::Tensor bias_activation(const Config& c, const at::Tensor& x, const OptT& bias);
/// \brief -> (grad_x, grad_bias or undefined).
T2 bias_activation_backward(const Config& c, const at::Tensor& g, const at::Tensor& x, const OptT& bias);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward);
/// \brief softmax(scale * scores) with the configured mask; scores [b, np, sq, sk], causal masks aligned to the
///        keys' end (query i sees keys j <= i + sk - sq).
at::Tensor masked_softmax(const Config& c, const at::Tensor& scores, const OptT& mask, double scale);
at::Tensor softmax_backward(const at::Tensor& g, const at::Tensor& probs, double scale);
/// \brief softmax(scale * scores + bias) with the configured mask (bias broadcast to scores).
at::Tensor biased_softmax(const Config& c, const at::Tensor& scores, const at::Tensor& bias, const OptT& mask,
                          double scale);
/// \brief -> (grad_scores, grad_bias of bias's shape).
T2 biased_softmax_backward(const at::Tensor& g, const at::Tensor& probs, double scale, at::IntArrayRef bias_shape);
/// \brief softmax(scale * scores) excluding mask's True entries (no causal rule): cross-attention.
at::Tensor padded_softmax(const at::Tensor& scores, const OptT& mask, double scale);

// ---- tensor-parallel regions ------------------------------------------------------------------------------
/// \brief Into the region, before a column-parallel GEMM: [s_local, b, h] -> [s, b, h] (all-gather of the
///        sequence under sequence parallelism, else identity).
at::Tensor enter_region(const Config& c, const TensorParallel& tp, const at::Tensor& x);
/// \brief Backward of enter_region: the GEMM input's gradient summed over ranks, [s, b, h] -> [s_local, b, h].
at::Tensor enter_region_backward(const Config& c, const TensorParallel& tp, const at::Tensor& g);
/// \brief Out of the region, after a row-parallel GEMM: partial sums [s, b, h] -> [s_local, b, h].
at::Tensor exit_region(const Config& c, const TensorParallel& tp, const at::Tensor& x);
/// \brief Backward of exit_region: [s_local, b, h] -> [s, b, h].
at::Tensor exit_region_backward(const Config& c, const TensorParallel& tp, const at::Tensor& g);

/// \brief enter_region_backward started, not waited for: `wait()` gives its result. Backward starts it right after
///        the input-gradient GEMM and waits after the weight-gradient GEMM, which runs meanwhile (Megatron's
///        overlap of tensor-parallel communication in backward). Synchronous when config.overlap_tp_comm is off.
class PendingRegionBackward {
 public:
  PendingRegionBackward(const Config& c, const TensorParallel& tp, const at::Tensor& g);
  at::Tensor wait();

 private:
  at::Tensor result_;
  std::function<at::Tensor()> finish_;
};

// ---- GEMMs -------------------------------------------------------------------------------------------------
/// \brief x [..., in] @ w[out, in]^T (+ bias) -> [..., out]: megacore's linear (ops/linear.h), whose skinny-linear
///        kernel serves decoding's few rows on CPU.
at::Tensor matmul_t(const at::Tensor& x, const at::Tensor& w, const OptT& bias = OptT());
/// \brief Gradients of y = x @ w^T: grad_x [..., in] and grad_w [out, in] (= g^T x over all rows).
T2 linear_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w);
/// \brief The sum of g over every row (a bias gradient), in g's dtype with accumulation in fp32.
at::Tensor bias_grad(const at::Tensor& g);

}  // namespace megacore::transformer
