// The softmax cross-entropy family over [tokens, vocab]: cross_entropy, its backward, and the per-shard
// statistics of the vocab-parallel loss. Schemas, argument checks, allocation, and the CPU and CUDA
// registrations; the kernels are kernels/cross_entropy.h's.
//
// Target range check: on CPU, one scan over the [tokens] ints before the kernel. On CUDA, the forward
// kernel lowers a device flag to the first row whose target is outside [0, vocab) and not ignore_index
// (that row's loss is 0), and the op reads it back with one .item(), a host sync per call, then raises the
// same ValueError as on CPU. While the stream is being captured into a CUDA graph the read-back is skipped
// (it cannot sync): bad targets then silently give loss 0.
#include "kernels/cross_entropy.h"

#include <limits>

#include "ops/op.h"

namespace megacore::ops {
namespace {

/// \brief The shape of one value per token: logits' leading shape (logits [..., vocab] -> [...]).
at::IntArrayRef token_shape(const at::Tensor& logits) { return logits.sizes().slice(0, logits.dim() - 1); }

/// \brief Checks logits (float, [..., vocab], vocab >= 1) and target (int64/int32, logits' leading shape,
///        same device).
void check_logits_target(const char* op, const at::Tensor& logits, const at::Tensor& target) {
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
void check_token_values(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  check_float_tensor(op, name, t);
  MEGACORE_CHECK_ARG(t.sizes() == token_shape(logits), op, name, " has shape ", shape_str(t.sizes()), ", expected ",
                     shape_str(token_shape(logits)), " (the leading shape of logits ", shape_str(logits.sizes()), ")");
  check_same_device(op, name, t, "logits", logits);
}

/// \brief The error of a target outside [0, vocab) that is not ignore_index (ValueError).
[[noreturn]] void fail_target_range(const char* op, int64_t index, int64_t value, int64_t vocab,
                                    int64_t ignore_index) {
  MEGACORE_CHECK_ARG(false, op, "target has value ", value, " at flat index ", index, ", expected a class in [0, ",
                     vocab, ") (vocab size ", vocab, ") or ignore_index (", ignore_index, ")");
  __builtin_unreachable();
}

/// \brief Raises a ValueError for the first target outside [0, vocab) that is not ignore_index (CPU targets).
template <typename I>
void check_range(const char* op, const I* t, int64_t n, int64_t vocab, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t[i];
    if ((v < 0 || v >= vocab) && v != ignore_index) fail_target_range(op, i, v, vocab, ignore_index);
  }
}

/// \brief Whether the current stream of `on`'s device is being captured into a CUDA graph.
bool capturing(const at::Tensor& on) {
#ifdef MEGACORE_WITH_CUDA
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(on.device().index()).stream();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
#else
  return false;
#endif
}

std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                                 int64_t ignore_index) {
  const char* op = "cross_entropy";
  check_logits_target(op, logits, target);
  const at::OptionalDeviceGuard guard(at::device_of(logits));
  const at::Tensor xc = logits.contiguous(), tc = target.contiguous();
  const int64_t vocab = logits.size(-1), rows = rows_of(logits);
  const bool int32 = tc.scalar_type() == at::kInt;
  // logits [..., vocab] -> loss, lse [...]
  at::Tensor loss = empty_row_stats(logits);
  at::Tensor lse = at::empty_like(loss);
  if (rows == 0) return {loss, lse};
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  at::Tensor bad_row;  // CUDA: lowered by the kernel to the first row with a bad target
  if (logits.is_cuda()) {
    bad_row = at::full({1}, kNone, logits.options().dtype(at::kLong));
  } else if (int32) {
    check_range(op, tc.const_data_ptr<int32_t>(), tc.numel(), vocab, ignore_index);
  } else {
    check_range(op, tc.const_data_ptr<int64_t>(), tc.numel(), vocab, ignore_index);
  }
  const kernels::CrossEntropyForward p{xc.const_data_ptr(), tc.const_data_ptr(), int32, loss.mutable_data_ptr(),
                                       lse.mutable_data_ptr(),
                                       bad_row.defined() ? bad_row.mutable_data_ptr<int64_t>() : nullptr,
                                       rows, vocab, ignore_index, dtype_of(logits)};
  MEGACORE_LAUNCH(op, cross_entropy_forward, logits, p);
  if (bad_row.defined() && !capturing(logits)) {
    const int64_t row = bad_row.item<int64_t>();
    if (row != kNone) fail_target_range(op, row, tc.reshape(-1)[row].item<int64_t>(), vocab, ignore_index);
  }
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& lse, int64_t vocab_start, int64_t ignore_index) {
  const char* op = "cross_entropy_backward";
  check_logits_target(op, logits, target);
  check_token_values(op, "grad_loss", grad_loss, logits);
  check_token_values(op, "lse", lse, logits);
  const at::OptionalDeviceGuard guard(at::device_of(logits));
  const at::Tensor xc = logits.contiguous(), tc = target.contiguous();
  // Per-token values in the accumulation type (a no-op for the fp32 loss's own gradient).
  const at::Tensor gc = grad_loss.to(acc_dtype(logits)).contiguous(), lc = lse.to(acc_dtype(logits)).contiguous();
  at::Tensor grad = at::empty_like(xc);  // [..., vocab], logits' dtype
  const kernels::CrossEntropyBackward p{gc.const_data_ptr(), xc.const_data_ptr(), tc.const_data_ptr(),
                                        tc.scalar_type() == at::kInt, lc.const_data_ptr(), grad.mutable_data_ptr(),
                                        rows_of(logits), logits.size(-1), vocab_start, ignore_index,
                                        dtype_of(logits)};
  MEGACORE_LAUNCH(op, cross_entropy_backward, logits, p);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vocab_parallel_cross_entropy_stats(const at::Tensor& logits,
                                                                                  const at::Tensor& target,
                                                                                  int64_t vocab_start,
                                                                                  int64_t ignore_index) {
  const char* op = "vocab_parallel_cross_entropy_stats";
  check_logits_target(op, logits, target);
  const at::OptionalDeviceGuard guard(at::device_of(logits));
  const at::Tensor xc = logits.contiguous(), tc = target.contiguous();
  // logits [..., vocab_local] -> max, sum_exp, target_logit [...]
  at::Tensor max = empty_row_stats(logits);
  at::Tensor sum_exp = at::empty_like(max), target_logit = at::empty_like(max);
  const kernels::VocabParallelCrossEntropyStats p{xc.const_data_ptr(), tc.const_data_ptr(),
                                                  tc.scalar_type() == at::kInt, max.mutable_data_ptr(),
                                                  sum_exp.mutable_data_ptr(), target_logit.mutable_data_ptr(),
                                                  rows_of(logits), logits.size(-1), vocab_start, ignore_index,
                                                  dtype_of(logits)};
  MEGACORE_LAUNCH(op, vocab_parallel_cross_entropy_stats, logits, p);
  return {max, sum_exp, target_logit};
}

void register_kernels(torch::Library& m) {
  m.impl("cross_entropy", &cross_entropy);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
  m.impl("vocab_parallel_cross_entropy_stats", &vocab_parallel_cross_entropy_stats);
}

}  // namespace
}  // namespace megacore::ops

TORCH_LIBRARY_FRAGMENT(megacore, m) {
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

MEGACORE_REGISTER_KERNELS(megacore::ops::register_kernels)
