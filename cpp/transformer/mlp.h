#pragma once
// The layer's MLP: column-parallel fc1, the fused bias + activation (GeLU, ReLU, or gated: GeGLU, SwiGLU, ReGLU
// on fc1's [gate; up] halves), row-parallel fc2.
#include <ATen/ATen.h>

#include <tuple>

#include "transformer/attention.h"
#include "transformer/config.h"
#include "transformer/pieces.h"

namespace megacore::transformer {

/// \brief fc2(act(fc1(x))) out of the tensor-parallel region, before fc2's bias: [s_local, b, h] -> [s_local, b, h].
///        Keeps fc1's output and the activation's in `saved` when given (training), not when null (decoding).
at::Tensor mlp_forward(const Config& c, const TensorParallel& tp, const at::Tensor& x, const Params& p, Saved* saved);

struct MlpGrads {
  at::Tensor x, fc1_weight, fc1_bias, fc2_weight;  // fc1_bias undefined without one
};
/// \brief Backward of mlp_forward: g [s_local, b, h] is the gradient of its output.
MlpGrads mlp_backward(const Config& c, const TensorParallel& tp, const at::Tensor& g, const at::Tensor& x,
                      const Params& p, const Saved& saved);

}  // namespace megacore::transformer
