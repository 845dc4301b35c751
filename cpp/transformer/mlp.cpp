// The layer's MLP (mlp.h).
#include "transformer/mlp.h"

namespace megacore::transformer {

at::Tensor mlp_forward(const Config& c, const TensorParallel& tp, const at::Tensor& x, const Params& p, Saved* saved) {
  at::Tensor fc1 = matmul_t(enter_region(c, tp, x), p[k_fc1_weight]);  // [s, b, f], gated [s, b, 2f] = [gate; up]
  at::Tensor act = bias_activation(c, fc1, p.opt(k_fc1_bias));
  if (saved != nullptr) {
    (*saved)[kSlot_fc1_out] = fc1;
    (*saved)[kSlot_act_out] = act;
  }
  return exit_region(c, tp, matmul_t(act, p[k_fc2_weight]));  // [s_local, b, h]
}

MlpGrads mlp_backward(const Config& c, const TensorParallel& tp, const at::Tensor& g, const at::Tensor& x,
                      const Params& p, const Saved& saved) {
  MlpGrads out;
  at::Tensor g_act, g_fc1;
  std::tie(g_act, out.fc2_weight) = linear_backward(exit_region_backward(c, tp, g), saved[kSlot_act_out],
                                                    p[k_fc2_weight]);
  std::tie(g_fc1, out.fc1_bias) = bias_activation_backward(c, g_act, saved[kSlot_fc1_out], p.opt(k_fc1_bias));
  ColumnGrads fc1 = column_parallel_backward(c, tp, g_fc1, x, p[k_fc1_weight], /*has_bias=*/false);  // bias: above
  out.x = fc1.x;  // [s_local, b, h]
  out.fc1_weight = fc1.weight;
  return out;
}

}  // namespace megacore::transformer
