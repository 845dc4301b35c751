#pragma once
// \brief Device-agnostic argument checks of cross_entropy, cross_entropy_backward and
//        vocab_parallel_cross_entropy_stats, shared by the CPU and CUDA glue.
#include <ATen/core/Tensor.h>

#include "common/checks.h"

namespace megacore::ops {

/// \brief The shape of one value per token: logits' leading shape (logits [..., vocab] -> [...]).
inline at::IntArrayRef token_shape(const at::Tensor& logits) { return logits.sizes().slice(0, logits.dim() - 1); }

/// \brief Checks logits (float, [..., vocab], vocab >= 1) and target (int64/int32, logits' leading shape,
///        same device).
inline void check_logits_target(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  check_float_tensor(op, "logits", logits);
  check_min_dim(op, "logits", logits, 1, "[..., vocab]");
  MEGACORE_CHECK_ARG(logits.size(-1) >= 1, op, "logits has shape ", shape_str(logits.sizes()),
                     ", expected a vocab (last) dim of at least 1");
  MEGACORE_CHECK_ARG(target.defined(), op, "target is undefined");
  MEGACORE_CHECK_TYPE(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt, op, "target has dtype ",
                      target.scalar_type(), ", expected int64 or int32");
  MEGACORE_CHECK_ARG(target.sizes() == token_shape(logits), op, "target has shape ", shape_str(target.sizes()),
                     ", expected ", shape_str(token_shape(logits)), " (the leading shape of logits ",
                     shape_str(logits.sizes()), ")");
  check_same_device(op, "target", target, "logits", logits);
}

/// \brief Checks a per-token float tensor of the backward (grad_loss, lse): logits' leading shape and device.
inline void check_token_values(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  check_float_tensor(op, name, t);
  MEGACORE_CHECK_ARG(t.sizes() == token_shape(logits), op, name, " has shape ", shape_str(t.sizes()), ", expected ",
                     shape_str(token_shape(logits)), " (the leading shape of logits ", shape_str(logits.sizes()), ")");
  check_same_device(op, name, t, "logits", logits);
}

/// \brief The error of a target outside [0, vocab) that is not ignore_index (ValueError).
[[noreturn]] inline void fail_target_range(const char* op, int64_t index, int64_t value, int64_t vocab,
                                           int64_t ignore_index) {
  MEGACORE_CHECK_ARG(false, op, "target has value ", value, " at flat index ", index, ", expected a class in [0, ",
                     vocab, ") (vocab size ", vocab, ") or ignore_index (", ignore_index, ")");
  __builtin_unreachable();
}

}  // namespace megacore::ops
