// CUDA glue of cross_entropy: checks (shared with the CPU glue), contiguity, allocation, launch on the
// current stream.
//
// Target range check: the forward kernel lowers a device flag to the first row whose target is outside
// [0, vocab) and not ignore_index (that row's loss is 0), and the glue reads it back with one .item(),
// a host sync per call, then raises the same ValueError as on CPU. While the stream is being captured
// into a CUDA graph the read-back is skipped (it cannot sync): bad targets then silently give loss 0.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>

#include "cross_entropy.h"  // cuda/cross_entropy.h
#include "cuda/glue.h"
#include "ops/cross_entropy.h"
#include "common/tensors.h"

namespace megacore::cuda_glue {
namespace {

bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream, &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy(const at::Tensor& logits, const at::Tensor& target,
                                                 int64_t ignore_index) {
  const char* op = "cross_entropy";
  ops::check_logits_target(op, logits, target);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor xc = logits.contiguous(), tc = target.contiguous();
  const int64_t vocab = logits.size(-1), rows = rows_of(logits);
  // logits [..., vocab] -> loss, lse [...]
  at::Tensor loss = at::empty(ops::token_shape(logits), logits.options().dtype(acc_dtype(logits)));
  at::Tensor lse = at::empty_like(loss);
  if (rows == 0) return {loss, lse};
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  at::Tensor bad_row = at::full({1}, kNone, logits.options().dtype(at::kLong));
  const cudaStream_t stream = stream_of(logits);
  MEGACORE_CUDA_CHECK(op, cuda::cross_entropy_forward(xc.const_data_ptr(), tc.const_data_ptr(),
                                                      tc.scalar_type() == at::kInt, loss.mutable_data_ptr(),
                                                      lse.mutable_data_ptr(), bad_row.mutable_data_ptr<int64_t>(),
                                                      rows, vocab, ignore_index, dtype_of(logits), stream));
  if (!capturing(stream)) {
    const int64_t row = bad_row.item<int64_t>();
    if (row != kNone) ops::fail_target_range(op, row, tc.reshape(-1)[row].item<int64_t>(), vocab, ignore_index);
  }
  return {loss, lse};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const at::Tensor& lse, int64_t vocab_start, int64_t ignore_index) {
  const char* op = "cross_entropy_backward";
  ops::check_logits_target(op, logits, target);
  ops::check_token_values(op, "grad_loss", grad_loss, logits);
  ops::check_token_values(op, "lse", lse, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor xc = logits.contiguous(), tc = target.contiguous();
  const at::Tensor gc = grad_loss.to(acc_dtype(logits)).contiguous(), lc = lse.to(acc_dtype(logits)).contiguous();
  at::Tensor grad = at::empty_like(xc);  // [..., vocab], logits' dtype
  MEGACORE_CUDA_CHECK(op, cuda::cross_entropy_backward(gc.const_data_ptr(), xc.const_data_ptr(), tc.const_data_ptr(),
                                                       tc.scalar_type() == at::kInt, lc.const_data_ptr(),
                                                       grad.mutable_data_ptr(), rows_of(logits), logits.size(-1),
                                                       vocab_start, ignore_index, dtype_of(logits),
                                                       stream_of(logits)));
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vocab_parallel_cross_entropy_stats(const at::Tensor& logits,
                                                                                  const at::Tensor& target,
                                                                                  int64_t vocab_start,
                                                                                  int64_t ignore_index) {
  const char* op = "vocab_parallel_cross_entropy_stats";
  ops::check_logits_target(op, logits, target);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor xc = logits.contiguous(), tc = target.contiguous();
  // logits [..., vocab_local] -> max, sum_exp, target_logit [...]
  at::Tensor max = at::empty(ops::token_shape(logits), logits.options().dtype(acc_dtype(logits)));
  at::Tensor sum_exp = at::empty_like(max), target_logit = at::empty_like(max);
  MEGACORE_CUDA_CHECK(op, cuda::vocab_parallel_cross_entropy_stats(
                              xc.const_data_ptr(), tc.const_data_ptr(), tc.scalar_type() == at::kInt,
                              max.mutable_data_ptr(), sum_exp.mutable_data_ptr(), target_logit.mutable_data_ptr(),
                              rows_of(logits), logits.size(-1), vocab_start, ignore_index, dtype_of(logits),
                              stream_of(logits)));
  return {max, sum_exp, target_logit};
}

}  // namespace
}  // namespace megacore::cuda_glue

TORCH_LIBRARY_IMPL(megacore, CUDA, m) {
  m.impl("cross_entropy", &megacore::cuda_glue::cross_entropy);
  m.impl("cross_entropy_backward", &megacore::cuda_glue::cross_entropy_backward);
  m.impl("vocab_parallel_cross_entropy_stats", &megacore::cuda_glue::vocab_parallel_cross_entropy_stats);
}
