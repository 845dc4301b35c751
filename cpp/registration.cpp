// The schema of every megacore op, defined once. Implementations register per dispatch key in
// cpp/cpu/<family>.cpp and cpp/cuda/<family>.cpp; fake (meta) kernels and autograd are registered from
// python/megacore/ops/<family>.py (imported by `import megacore`, the only way _C is loaded). Backward passes are ops of their own, so torch.compile, the profiler
// and Nsight see them by name.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "common/checks.h"

namespace {

// Every op checks that its tensors share one device at BackendSelect, before a kernel is picked from the
// tensors' devices. The highest backend among them wins, and Meta ranks above CPU and CUDA: without this,
// one meta tensor among CPU ones runs the fake kernel, which returns uninitialized CPU memory, and the
// CPU kernel never sees the meta tensor to reject it.
void check_devices_then_dispatch(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  megacore::check_devices(schema, torch::jit::last(*stack, schema.arguments().size()));
  op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect),
                     stack);
}

/// \brief Defines an op from its schema and registers its device check (an argument named `seed` is a host
///        value: it stays on CPU whatever the device of the others).
void def(torch::Library& m, const char* schema) {
  m.def(schema);
  const std::string name(schema, std::strchr(schema, '('));
  m.impl(name.c_str(), torch::dispatch(c10::DispatchKey::BackendSelect,
                                       torch::CppFunction::makeFromBoxedFunction<&check_devices_then_dispatch>()));
}

}  // namespace

// The transformer layer's parameters and configuration, shared by its forward and backward schemas.
#define MEGACORE_LAYER_PARAMS                                                                              \
  "Tensor? attention_norm_weight, Tensor? attention_norm_bias, Tensor qkv_weight, Tensor? qkv_bias,"        \
  " Tensor proj_weight, Tensor? proj_bias, Tensor? mlp_norm_weight, Tensor? mlp_norm_bias, Tensor fc1_weight," \
  " Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias"
#define MEGACORE_LAYER_CONFIG                                                                              \
  "int num_heads, str normalization, float norm_eps, bool pre_norm, str mask_kind, int? window,"           \
  " str activation, float attention_dropout, float hidden_dropout, bool sequence_parallel,"                \
  " bool recompute_attention, str attention_backend, str group_name, bool training"

TORCH_LIBRARY(megacore, m) {

  // ---- bias + GeLU: y = gelu(x + bias), bias over the last dim -------------------------------------
  def(m, "bias_gelu(Tensor x, Tensor? bias, str approximate='tanh') -> Tensor");
  // -> (grad_x, grad_bias); grad_bias is empty ([0]) when bias is None.
  def(m, "bias_gelu_backward(Tensor grad_out, Tensor x, Tensor? bias, str approximate) -> (Tensor, Tensor)");

  // ---- residual + dropout(x + bias); the keep mask is a function of (seed, element index) ------------
  // seed: int64 CPU tensor of one element.
  def(m, "bias_dropout_add(Tensor x, Tensor? bias, Tensor residual, float p, Tensor seed) -> Tensor");
  // -> (grad_x, grad_bias); grad_x = grad_out * mask / (1 - p), grad_bias = grad_x summed over rows
  //    (empty when has_bias is false). The residual's gradient is grad_out itself.
  def(m, "bias_dropout_add_backward(Tensor grad_out, float p, Tensor seed, bool has_bias) -> (Tensor, Tensor)");

  // ---- normalization over the last dim, statistics in fp32 (fp64 for fp64 input) ---------------------
  // -> (out, mean, rstd); mean and rstd have the input's leading shape.
  def(m, "layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_weight, grad_bias); grad_weight/grad_bias empty when weight/bias is None.
  def(m,
      "layer_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias)"
      " -> (Tensor, Tensor, Tensor)");
  // -> (out, rstd)
  def(m, "rms_norm(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  // -> (grad_x, grad_weight); grad_weight empty when weight is None.
  def(m, "rms_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");

  // ---- softmax(scale * scores) over the last dim with masking; fully masked rows give zeros ----------
  // mask: bool, broadcastable to scores, True = exclude (Megatron's convention).
  def(m, "scaled_masked_softmax(Tensor scores, Tensor? mask, float scale) -> Tensor");
  // scores [..., sq, sk]; query i sees keys j <= i + (sk - sq), and with a window w only j > i + (sk - sq) - w.
  def(m, "scaled_causal_softmax(Tensor scores, float scale, int? window=None) -> Tensor");
  // grad_scores = scale * probs * (grad_out - sum(grad_out * probs)), for every mask kind.
  def(m, "scaled_softmax_backward(Tensor grad_out, Tensor probs, float scale) -> Tensor");

  // ---- rotary position embedding, rotate-half pairing, x [seq, ..., head_dim], cos/sin [seq, rot] ----
  def(m, "apply_rotary_emb(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  def(m, "apply_rotary_emb_backward(Tensor grad_out, Tensor cos, Tensor sin) -> Tensor");

  // ---- softmax cross-entropy over [tokens, vocab] ----------------------------------------------------
  // -> (loss, lse), both [tokens] in fp32 (fp64 for fp64 logits); lse = logsumexp of each row, kept for
  //    backward instead of the softmax.
  def(m, "cross_entropy(Tensor logits, Tensor target, int ignore_index=-100) -> (Tensor, Tensor)");
  // grad_logits = grad_loss * (softmax - onehot(target - vocab_start)); rows whose target is ignore_index
  // get 0. With vocab_start != 0 and the global lse, this is the backward of the vocab-parallel loss too.
  def(m,
      "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor lse, int vocab_start,"
      " int ignore_index) -> Tensor");
  // One pass over a vocab shard [tokens, vocab_local] -> (local max, sum of exp(logit - local max),
  // logit of the target if it falls in [vocab_start, vocab_start + vocab_local), else 0); all [tokens], fp32.
  def(m,
      "vocab_parallel_cross_entropy_stats(Tensor logits, Tensor target, int vocab_start, int ignore_index)"
      " -> (Tensor, Tensor, Tensor)");

  // ---- the transformer layer (cpp/transformer/layer.cpp) ---------------------------------------------
  // hidden [s_local, b, h] -> (out [s_local, b, h], saved): saved holds what backward needs, in a fixed
  // order of slots (python/megacore/transformer/layer.py). Parameters are this rank's shards; the
  // tensor-parallel group is resolved from group_name ("" = none). seed: int64 CPU tensor of one element.
  def(m,
      "transformer_layer(Tensor hidden, " MEGACORE_LAYER_PARAMS ", Tensor? attention_mask, Tensor? rotary_cos,"
      " Tensor? rotary_sin, Tensor seed, " MEGACORE_LAYER_CONFIG ") -> (Tensor, Tensor[])");
  // -> [grad_hidden, one gradient per parameter in the order above (empty [0] for a None parameter)].
  def(m,
      "transformer_layer_backward(Tensor grad_out, Tensor hidden, " MEGACORE_LAYER_PARAMS ", Tensor? attention_mask,"
      " Tensor? rotary_cos, Tensor? rotary_sin, Tensor seed, Tensor[] saved, " MEGACORE_LAYER_CONFIG ") -> Tensor[]");
}
