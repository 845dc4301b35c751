// Schemas of the op families not yet in cpp/ops/<family>.cpp (being moved there one family at a time).
#include <torch/library.h>

#include "ops/op.h"

TORCH_LIBRARY_FRAGMENT(megacore, m) {

  // ---- normalization over the last dim, statistics in fp32 (fp64 for fp64 input) ---------------------
  // -> (out, mean, rstd); mean and rstd have the input's leading shape.
  megacore::ops::define_op(m, "layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_weight, grad_bias); grad_weight/grad_bias empty when weight/bias is None.
  megacore::ops::define_op(m,
      "layer_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias)"
      " -> (Tensor, Tensor, Tensor)");
  // -> (out, rstd)
  megacore::ops::define_op(m, "rms_norm(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  // -> (grad_x, grad_weight); grad_weight empty when weight is None.
  megacore::ops::define_op(m, "rms_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");

  // ---- rotary position embedding, rotate-half pairing, x [seq, ..., head_dim], cos/sin [seq, rot] ----
  megacore::ops::define_op(m, "apply_rotary_emb(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  megacore::ops::define_op(m, "apply_rotary_emb_backward(Tensor grad_out, Tensor cos, Tensor sin) -> Tensor");
}
