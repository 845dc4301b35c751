// Schemas of the op families not yet in cpp/ops/<family>.cpp (being moved there one family at a time).
#include <torch/library.h>

#include "ops/op.h"

TORCH_LIBRARY_FRAGMENT(megacore, m) {

  // ---- residual + dropout(x + bias); the keep mask is a function of (seed, element index) ------------
  // seed: int64 CPU tensor of one element.
  megacore::ops::define_op(m, "bias_dropout_add(Tensor x, Tensor? bias, Tensor residual, float p, Tensor seed) -> Tensor");
  // -> (grad_x, grad_bias); grad_x = grad_out * mask / (1 - p), grad_bias = grad_x summed over rows
  //    (empty when has_bias is false). The residual's gradient is grad_out itself.
  megacore::ops::define_op(m, "bias_dropout_add_backward(Tensor grad_out, float p, Tensor seed, bool has_bias) -> (Tensor, Tensor)");

  // ---- softmax(scale * scores) over the last dim with masking; fully masked rows give zeros ----------
  // mask: bool, broadcastable to scores, True = exclude (Megatron's convention).
  megacore::ops::define_op(m, "scaled_masked_softmax(Tensor scores, Tensor? mask, float scale) -> Tensor");
  // scores [..., sq, sk]; query i sees keys j <= i + (sk - sq), and with a window w only j > i + (sk - sq) - w.
  megacore::ops::define_op(m, "scaled_causal_softmax(Tensor scores, float scale, int? window=None) -> Tensor");
  // grad_scores = scale * probs * (grad_out - sum(grad_out * probs)), for every mask kind.
  megacore::ops::define_op(m, "scaled_softmax_backward(Tensor grad_out, Tensor probs, float scale) -> Tensor");

  // ---- softmax cross-entropy over [tokens, vocab] ----------------------------------------------------
  // -> (loss, lse), both [tokens] in fp32 (fp64 for fp64 logits); lse = logsumexp of each row, kept for
  //    backward instead of the softmax.
  megacore::ops::define_op(m, "cross_entropy(Tensor logits, Tensor target, int ignore_index=-100) -> (Tensor, Tensor)");
  // grad_logits = grad_loss * (softmax - onehot(target - vocab_start)); rows whose target is ignore_index
  // get 0. With vocab_start != 0 and the global lse, this is the backward of the vocab-parallel loss too.
  megacore::ops::define_op(m,
      "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, int vocab_start,"
      " int ignore_index) -> Tensor");
  // One pass over a vocab shard [tokens, vocab_local] -> (local max, sum of exp(logit - local max),
  // logit of the target if it falls in [vocab_start, vocab_start + vocab_local), else 0); all [tokens], fp32.
  megacore::ops::define_op(m,
      "vocab_parallel_cross_entropy_stats(Tensor logits, Tensor target, int vocab_start, int ignore_index)"
      " -> (Tensor, Tensor, Tensor)");

}
