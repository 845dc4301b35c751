#pragma once
// \brief The softmax cross-entropy kernels (kernels/cpu/cross_entropy.cpp, kernels/cuda/cross_entropy.cu) and
//        the formulas both compute. logits/grad_logits are contiguous [rows, vocab] of `dtype`; target is
//        contiguous [rows] of int32 (target_int32) or int64; per-token values (loss, lse, grad_loss, the
//        stats) are contiguous [rows] of the accumulation type (fp32, fp64 for fp64 logits).
#include "kernels/common.h"

namespace megacore::kernels {

struct CrossEntropyForward {
  const void* logits;
  const void* target;
  bool target_int32;
  void* loss;        // lse - logits[target]; 0 where target == ignore_index
  void* lse;         // logsumexp of each row
  // CUDA: one int64 on the device, set to INT64_MAX by the caller; a target outside [0, vocab) that is not
  // ignore_index gets loss 0 and lowers it to its row, so the caller can raise. The CPU kernel takes targets
  // the caller has range-checked already and ignores it (null).
  int64_t* bad_row;
  int64_t rows, vocab;
  int64_t ignore_index;
  DType dtype;
};

struct CrossEntropyBackward {
  const void* grad_loss;  // [rows], accumulation type
  const void* logits;
  const void* target;
  bool target_int32;
  const void* lse;        // [rows], accumulation type
  void* grad_logits;      // grad_loss * (exp(logits - lse) - onehot(target - vocab_start)); 0 rows where ignored
  int64_t rows, vocab;
  int64_t vocab_start;    // the one-hot only where target - vocab_start is in [0, vocab)
  int64_t ignore_index;
  DType dtype;
};

struct VocabParallelCrossEntropyStats {
  const void* logits;     // a vocab shard [rows, vocab]
  const void* target;
  bool target_int32;
  void* max;              // row max
  void* sum_exp;          // sum of exp(logit - row max)
  void* target_logit;     // logit of target - vocab_start when in [0, vocab) and target != ignore_index, else 0
  int64_t rows, vocab;
  int64_t vocab_start;
  int64_t ignore_index;
  DType dtype;
};

namespace cross_entropy {

/// The column of row's target in a shard [vocab_start, vocab_start + vocab) of the vocabulary, or -1 when
/// the target is ignore_index or outside the shard.
MEGACORE_HD int64_t local_target(int64_t target, int64_t vocab_start, int64_t vocab, int64_t ignore_index) {
  const int64_t local = target - vocab_start;
  return target != ignore_index && local >= 0 && local < vocab ? local : -1;
}

/// One term of a row's sum of exponentials relative to its (running) max m: exp(x - m), x <= m.
template <typename V>
MEGACORE_HD V exp_term(V x, V m) {
  return Math<V>::fast_exp(x - m);
}

/// The factor that moves a sum of exponentials relative to max m to a max m_new >= m: exp(m - m_new)
/// (0 when m is -inf, the start of a row).
template <typename V>
MEGACORE_HD V rescale(V m, V m_new) {
  return Math<V>::exp(m - m_new);
}

/// logsumexp of a row from its max and its sum of exp(x - max).
template <typename V>
MEGACORE_HD V lse(V max, V sum_exp) {
  return max + Math<V>::log(sum_exp);
}

/// The loss of a row whose target is not ignored: lse - logit of the target.
template <typename V>
MEGACORE_HD V loss(V lse, V target_logit) {
  return lse - target_logit;
}

/// d loss / d x of one logit x: grad_loss * (softmax(x) - onehot), softmax(x) = exp(x - lse); onehot is 1
/// on the target's column, else 0.
template <typename V>
MEGACORE_HD V grad(V grad_loss, V x, V lse, V onehot) {
  return grad_loss * (Math<V>::fast_exp(x - lse) - onehot);
}

}  // namespace cross_entropy
}  // namespace megacore::kernels

MEGACORE_KERNEL(cross_entropy_forward, CrossEntropyForward)
MEGACORE_KERNEL(cross_entropy_backward, CrossEntropyBackward)
MEGACORE_KERNEL(vocab_parallel_cross_entropy_stats, VocabParallelCrossEntropyStats)
