// CPU glue of cross_entropy: checks (the target range check is here: one scan over [tokens] ints),
// contiguity, allocation, then the kernel of the active ISA.
#include "cpu/cross_entropy.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "ops/cross_entropy.h"
#include "common/tensors.h"

namespace megacore::cpu {
namespace {

/// \brief Raises a ValueError for the first target outside [0, vocab) that is not ignore_index.
template <typename I>
void check_range(const char* op, const I* t, int64_t n, int64_t vocab, int64_t ignore_index) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t[i];
    if ((v < 0 || v >= vocab) && v != ignore_index) ops::fail_target_range(op, i, v, vocab, ignore_index);
  }
}

std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                                 int64_t ignore_index) {
  ops::check_logits_target("cross_entropy", logits, target);
  const at::Tensor xc = logits.contiguous(), tc = target.contiguous();
  const int64_t vocab = logits.size(-1);
  if (tc.scalar_type() == at::kInt) {
    check_range("cross_entropy", tc.const_data_ptr<int32_t>(), tc.numel(), vocab, ignore_index);
  } else {
    check_range("cross_entropy", tc.const_data_ptr<int64_t>(), tc.numel(), vocab, ignore_index);
  }
  // logits [..., vocab] -> loss, lse [...]
  at::Tensor loss = at::empty(ops::token_shape(logits), logits.options().dtype(acc_dtype(logits)));
  at::Tensor lse = at::empty_like(loss);
  cross_entropy_forward_kernel()(xc, tc, loss, lse, ignore_index);
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& lse, int64_t vocab_start, int64_t ignore_index) {
  const char* op = "cross_entropy_backward";
  ops::check_logits_target(op, logits, target);
  ops::check_token_values(op, "grad_loss", grad_loss, logits);
  ops::check_token_values(op, "lse", lse, logits);
  const at::Tensor xc = logits.contiguous(), tc = target.contiguous();
  // Per-token values in the accumulation type (a no-op for the fp32 loss's own gradient).
  const at::Tensor gc = grad_loss.to(acc_dtype(logits)).contiguous(), lc = lse.to(acc_dtype(logits)).contiguous();
  at::Tensor grad = at::empty_like(xc);  // [..., vocab], logits' dtype
  cross_entropy_backward_kernel()(gc, xc, tc, lc, grad, vocab_start, ignore_index);
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vocab_parallel_cross_entropy_stats(const at::Tensor& logits,
                                                                                  const at::Tensor& target,
                                                                                  int64_t vocab_start,
                                                                                  int64_t ignore_index) {
  ops::check_logits_target("vocab_parallel_cross_entropy_stats", logits, target);
  const at::Tensor xc = logits.contiguous(), tc = target.contiguous();
  // logits [..., vocab_local] -> max, sum_exp, target_logit [...]
  at::Tensor max = at::empty(ops::token_shape(logits), logits.options().dtype(acc_dtype(logits)));
  at::Tensor sum_exp = at::empty_like(max), target_logit = at::empty_like(max);
  vocab_parallel_cross_entropy_stats_kernel()(xc, tc, max, sum_exp, target_logit, vocab_start, ignore_index);
  return {max, sum_exp, target_logit};
}

}  // namespace
}  // namespace megacore::cpu

TORCH_LIBRARY_IMPL(megacore, CPU, m) {
  m.impl("cross_entropy", &megacore::cpu::cross_entropy);
  m.impl("cross_entropy_backward", &megacore::cpu::cross_entropy_backward);
  m.impl("vocab_parallel_cross_entropy_stats", &megacore::cpu::vocab_parallel_cross_entropy_stats);
}
