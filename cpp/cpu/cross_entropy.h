#pragma once
// \brief CPU kernels of cross_entropy (cpp/cpu/kernels/cross_entropy.cpp). logits are contiguous, viewed
//        as [rows, vocab]; target (int64 or int32), grad_loss and the per-token outputs are contiguous [rows];
//        per-token float tensors are fp32 (fp64 for fp64 logits). Targets are already range-checked.
#include <ATen/core/Tensor.h>

#include "common/isa.h"

// loss = lse - logits[target] (0 where target == ignore_index), lse = logsumexp of each row.
MEGACORE_CPU_KERNEL(cross_entropy_forward, void(const at::Tensor& logits, const at::Tensor& target,
                                                const at::Tensor& loss, const at::Tensor& lse, int64_t ignore_index))
// grad_logits = grad_loss * (exp(logits - lse) - onehot(target - vocab_start)); 0 rows where ignored.
MEGACORE_CPU_KERNEL(cross_entropy_backward,
                    void(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                         const at::Tensor& lse, const at::Tensor& grad_logits, int64_t vocab_start,
                         int64_t ignore_index))
// (row max, sum of exp(logit - row max), logit of target - vocab_start if in the shard and not ignored else 0).
MEGACORE_CPU_KERNEL(vocab_parallel_cross_entropy_stats,
                    void(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& max,
                         const at::Tensor& sum_exp, const at::Tensor& target_logit, int64_t vocab_start,
                         int64_t ignore_index))
