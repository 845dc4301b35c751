#pragma once
// \brief CUDA launchers of cross_entropy. logits/grad_logits are contiguous [rows, vocab] of `dtype`;
//        target is contiguous [rows] of int32 (target_int32) or int64; per-token values (loss, lse,
//        grad_loss, stats) are contiguous [rows] of fp32 (fp64 for fp64 logits).
#include "common.h"

namespace megacore::cuda {

/// \brief lse = logsumexp of each row, loss = lse - logits[target] (0 where target == ignore_index).
///        A target outside [0, vocab) that is not ignore_index gets loss 0 and lowers *bad_row (one
///        int64 on the device, set to INT64_MAX by the caller) to its row, so the caller can raise.
cudaError_t cross_entropy_forward(const void* logits, const void* target, bool target_int32, void* loss, void* lse,
                                  int64_t* bad_row, int64_t rows, int64_t vocab, int64_t ignore_index, DType dtype,
                                  cudaStream_t stream);

/// \brief grad_logits = grad_loss * (exp(logits - lse) - onehot(target - vocab_start)), the onehot only
///        where target - vocab_start is in [0, vocab); rows whose target is ignore_index are 0.
cudaError_t cross_entropy_backward(const void* grad_loss, const void* logits, const void* target, bool target_int32,
                                   const void* lse, void* grad_logits, int64_t rows, int64_t vocab, int64_t vocab_start,
                                   int64_t ignore_index, DType dtype, cudaStream_t stream);

/// \brief Per row of a vocab shard: max, sum of exp(logit - max), and the logit of target - vocab_start
///        when it is in [0, vocab) and target != ignore_index, else 0.
cudaError_t vocab_parallel_cross_entropy_stats(const void* logits, const void* target, bool target_int32, void* max,
                                               void* sum_exp, void* target_logit, int64_t rows, int64_t vocab,
                                               int64_t vocab_start, int64_t ignore_index, DType dtype,
                                               cudaStream_t stream);

}  // namespace megacore::cuda
