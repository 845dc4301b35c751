#pragma once
// \brief The scaled softmax kernels (kernels/cpu/softmax.cpp, kernels/cuda/softmax.cu) and the element-wise
//        rules both compute: which keys a row sees (padding mask, causal window), where a row's additive bias
//        is, what an excluded key and a row with no visible key give, and the backward formulas.
//        scores/out/grad are contiguous [rows, sk] of `dtype`; softmax runs over sk in fp32 (fp64 for fp64),
//        one rounding on store.
#include "kernels/common.h"

namespace megacore::kernels {

constexpr int kMaxMaskDims = 6;

/// \brief A bool mask (True = excluded) read in place as if expanded to scores [rows, sk]: row r is split
///        over `sizes` (outermost first, row-major like scores' leading dims, coalesced to at most
///        kMaxMaskDims dims) and its keys start at data + sum(index[d] * strides[d]) (stride 0 on broadcast
///        dims); keys are col_stride (0: one value per row, or 1) apart. data == null: no mask.
struct MaskRows {
  const bool* data;
  int ndim;
  int64_t sizes[kMaxMaskDims];
  int64_t strides[kMaxMaskDims];
  int64_t col_stride;
};

/// out = softmax(scale * scores) with keys excluded where the mask is true.
struct ScaledMaskedSoftmaxForward {
  const void* scores;
  void* out;
  int64_t rows, sk;
  DType dtype;
  double scale;
  MaskRows mask;  // mask.data may be null: no mask
};

/// Causal: row r is query i = r % sq and sees the keys softmax::causal_keys gives (sq <= sk).
struct ScaledCausalSoftmaxForward {
  const void* scores;
  void* out;
  int64_t rows, sq, sk;
  int64_t window;  // <= 0: no window
  DType dtype;
  double scale;
};

/// grad_scores = scale * probs * (grad_out - sum(grad_out * probs, -1)).
struct ScaledSoftmaxBackward {
  const void* grad_out;
  const void* probs;
  void* grad_scores;
  int64_t rows, sk;
  DType dtype;
  double scale;
};

/// \brief An additive bias [bias_b, bias_h, bias_sq, sk or 1] (contiguous, `dtype`) read as if expanded to
///        scores [b, h, sq, sk]: each leading dim of the bias is 1 (broadcast) or the scores' size, and
///        per_key says whether a bias row holds sk values or one for all keys. softmax::bias_row gives the
///        bias row a score row reads, softmax::score_row the score rows a bias row's gradient sums.
struct BiasLayout {
  int64_t b, h, sq;                 // scores' leading dims: rows = b * h * sq
  int64_t bias_b, bias_h, bias_sq;  // the bias's, each 1 or the scores' size
  bool per_key;                     // the bias's last dim is sk (else 1)
};

/// out = softmax(scale * scores + bias) with keys excluded by the mask and, when causal, by the causal
/// (sliding-window) rule; both may be given. scores/out are [b, h, sq, sk] (rows = b * h * sq).
struct ScaledBiasSoftmaxForward {
  const void* scores;
  const void* bias;  // BiasLayout over scores
  void* out;
  int64_t sk;
  BiasLayout bias_layout;
  MaskRows mask;  // mask.data may be null: no mask
  bool causal;    // sq <= sk when set
  int64_t window;  // causal only; <= 0: no window
  DType dtype;
  double scale;
};

/// dS = probs * (grad_out - sum(grad_out * probs, -1)); grad_scores = scale * dS; grad_bias = dS summed over
/// the bias's broadcast dims (its shape: bias_layout's, in `dtype`, summed in the accumulation type). The
/// score rows feeding one bias row are cut into softmax::bias_grad_chunks chunks; each chunk's sum is one
/// task, and the chunks' sums are added in chunk order (deterministic).
struct ScaledBiasSoftmaxBackward {
  const void* grad_out;
  const void* probs;
  void* grad_scores;
  void* grad_bias;
  void* workspace;  // CUDA: [bias_grad_chunks, bias elements] of the accumulation type; CPU: unused (null)
  int64_t sk;
  BiasLayout bias_layout;
  DType dtype;
  double scale;
};

namespace softmax {

// ---- where a row's bias is --------------------------------------------------------------------------

/// \brief Rows of the bias (the product of its leading dims), and values per bias row.
MEGACORE_HD int64_t bias_rows(const BiasLayout& l) { return l.bias_b * l.bias_h * l.bias_sq; }
MEGACORE_HD int64_t bias_cols(const BiasLayout& l, int64_t sk) { return l.per_key ? sk : 1; }

/// \brief The bias row score row `row` = (ib * h + ih) * sq + iq reads: index 0 on the bias's broadcast dims.
MEGACORE_HD int64_t bias_row(const BiasLayout& l, int64_t row) {
  const int64_t iq = row % l.sq, ih = (row / l.sq) % l.h, ib = row / (l.sq * l.h);
  return ((l.bias_b > 1 ? ib : 0) * l.bias_h + (l.bias_h > 1 ? ih : 0)) * l.bias_sq + (l.bias_sq > 1 ? iq : 0);
}

/// \brief The j-th (0 <= j < rows / bias_rows) score row that reads bias row `brow`: j runs over the bias's
///        broadcast dims (row-major), the bias's own index fills the others. On each dim one of the two is
///        always 0, so the score index is their sum.
MEGACORE_HD int64_t score_row(const BiasLayout& l, int64_t brow, int64_t j) {
  const int64_t bq = brow % l.bias_sq, bh = (brow / l.bias_sq) % l.bias_h, bb = brow / (l.bias_sq * l.bias_h);
  const int64_t fq = l.sq / l.bias_sq, fh = l.h / l.bias_h;  // sizes of the broadcast dims (1 where not)
  const int64_t jq = j % fq, jh = (j / fq) % fh, jb = j / (fq * fh);
  return ((bb + jb) * l.h + (bh + jh)) * l.sq + (bq + jq);
}

/// \brief Tasks the bias gradient is cut into when there are few bias rows (and most score rows per chunk):
///        enough tasks to fill the CPU's threads and a GPU's warps, few enough that the chunks' partial sums
///        ([chunks, bias elements] of the accumulation type) stay small next to the scores.
constexpr int64_t kBiasGradTasks = 1024;
constexpr int64_t kBiasGradMaxChunkRows = int64_t(1) << 16;  // fp32 partial sums stay far from 2^24 terms

/// \brief How many chunks the score rows of each bias row are cut into for the bias gradient (1: every task
///        owns a bias row and writes it directly). A function of the shapes only, so results do not depend on
///        the thread count.
inline int64_t bias_grad_chunks(int64_t rows, int64_t brows) {
  if (rows <= 0 || brows <= 0) return 1;
  const int64_t per = rows / brows;  // score rows per bias row
  int64_t chunks = (kBiasGradTasks + brows - 1) / brows;
  const int64_t min_chunks = (per + kBiasGradMaxChunkRows - 1) / kBiasGradMaxChunkRows;
  if (chunks < min_chunks) chunks = min_chunks;
  if (chunks > per) chunks = per;
  return chunks < 1 ? 1 : chunks;
}

// ---- which keys a row sees --------------------------------------------------------------------------

/// \brief Element offset of row `row`'s first mask value in mask.data.
MEGACORE_HD int64_t mask_row_offset(const MaskRows& mask, int64_t row) {
  int64_t off = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int d = kMaxMaskDims - 1; d >= 0; --d) {  // a fixed trip count: unrolled, the layout stays in registers
    if (d < mask.ndim) {
      off += (row % mask.sizes[d]) * mask.strides[d];
      row /= mask.sizes[d];
    }
  }
  return off;
}

/// \brief Whether key c is excluded by the mask values of its row (`row_mask` from mask_row_offset, keys
///        col_stride apart; null: none excluded).
MEGACORE_HD bool key_excluded(const bool* row_mask, int64_t col_stride, int64_t c) {
  return row_mask != nullptr && row_mask[c * col_stride];
}

/// \brief The keys [lo, hi) a causal row sees: query i = row % sq, aligned to the end of the keys, sees
///        j <= i + (sk - sq), and with a window w >= 1 only j > i + (sk - sq) - w. Never empty (sq <= sk).
struct KeyRange {
  int64_t lo, hi;
};
MEGACORE_HD KeyRange causal_keys(int64_t row, int64_t sq, int64_t sk, int64_t window) {
  const int64_t hi = row % sq + (sk - sq) + 1;
  return {window > 0 && hi > window ? hi - window : int64_t(0), hi};
}

// ---- forward: p = exp(s - max) / sum, s = scale * score -----------------------------------------------

/// \brief The scaled score of a key.
template <typename V>
MEGACORE_HD V scaled_score(V x, V scale) {
  return x * scale;
}

/// \brief The biased score of a key: scale * x + bias.
template <typename V>
MEGACORE_HD V biased_score(V x, V scale, V bias) {
  return scaled_score(x, scale) + bias;
}

/// \brief What an excluded key's scaled score becomes: -inf, so that it never wins the max and
///        exp_shifted gives it 0.
template <typename V>
MEGACORE_HD V excluded_score() {
  return splat<V>(-static_cast<double>(INFINITY));
}

/// \brief A row whose largest scaled score is excluded_score (no visible key, or only -inf scores) is all
///        zeros, and so is its gradient (p = 0).
template <typename A>
MEGACORE_HD bool row_is_empty(A max) {
  return max == excluded_score<A>();
}

/// \brief exp(s - max): a key's share before normalization (0 for an excluded key).
template <typename V>
MEGACORE_HD V exp_shifted(V s, V max) {
  return Math<V>::fast_exp(s - max);
}

/// \brief What the shares of a row are multiplied by: 1 / sum, or 0 for an empty row.
template <typename A>
MEGACORE_HD A inv_sum(A sum, bool empty) {
  return empty ? A(0) : A(1) / sum;
}

/// \brief A probability from its share e = exp_shifted(s, max) and inv = inv_sum(sum, empty).
template <typename V>
MEGACORE_HD V normalized(V e, V inv) {
  return e * inv;
}

// ---- backward -------------------------------------------------------------------------------------

/// \brief d scores = scale * p * (g - dot), dot = sum(g * p) over the row.
template <typename V>
MEGACORE_HD V grad_score(V g, V p, V dot, V scale) {
  return scale * p * (g - dot);
}

/// \brief d(scale * score + bias) = p * (g - dot): the bias's gradient; the scores' is scale times it.
template <typename V>
MEGACORE_HD V grad_logit(V g, V p, V dot) {
  return p * (g - dot);
}

}  // namespace softmax
}  // namespace megacore::kernels

MEGACORE_KERNEL(scaled_masked_softmax_forward, ScaledMaskedSoftmaxForward)
MEGACORE_KERNEL(scaled_causal_softmax_forward, ScaledCausalSoftmaxForward)
MEGACORE_KERNEL(scaled_softmax_backward, ScaledSoftmaxBackward)
MEGACORE_KERNEL(scaled_bias_softmax_forward, ScaledBiasSoftmaxForward)
MEGACORE_KERNEL(scaled_bias_softmax_backward, ScaledBiasSoftmaxBackward)
