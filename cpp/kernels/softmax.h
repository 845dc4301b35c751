#pragma once
// \brief The scaled softmax kernels (kernels/cpu/softmax.cpp, kernels/cuda/softmax.cu) and the element-wise
//        rules both compute: which keys a row sees (padding mask, causal window), what an excluded key and a
//        row with no visible key give, and the backward formula. scores/out/grad are contiguous [rows, sk]
//        of `dtype`; softmax runs over sk in fp32 (fp64 for fp64), one rounding on store.
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

namespace softmax {

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

}  // namespace softmax
}  // namespace megacore::kernels

MEGACORE_KERNEL(scaled_masked_softmax_forward, ScaledMaskedSoftmaxForward)
MEGACORE_KERNEL(scaled_causal_softmax_forward, ScaledCausalSoftmaxForward)
MEGACORE_KERNEL(scaled_softmax_backward, ScaledSoftmaxBackward)
