#pragma once
// \brief Device-agnostic argument checks of the scaled softmax ops, shared by the CPU and CUDA glue, and
//        the row layout of a broadcast mask (read in place, never materialized at scores' size).
#include <ATen/core/Tensor.h>

#include <optional>

#include "common/checks.h"

namespace megacore::ops {

/// \brief scores must be a float tensor [..., sq, sk].
inline void check_scores(const char* op, const at::Tensor& scores) {
  check_float_tensor(op, "scores", scores);
  check_min_dim(op, "scores", scores, 2, "[..., sq, sk]");
}

/// \brief mask must be bool, on scores' device, and broadcastable to scores' shape.
inline void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& scores) {
  MEGACORE_CHECK_TYPE(mask.scalar_type() == at::kBool, op, "mask has dtype ", mask.scalar_type(),
                      ", expected Bool (True = excluded)");
  check_same_device(op, "mask", mask, "scores", scores);
  bool ok = mask.dim() <= scores.dim();
  for (int64_t d = 1; ok && d <= mask.dim(); ++d) {
    ok = mask.size(-d) == 1 || mask.size(-d) == scores.size(-d);
  }
  MEGACORE_CHECK_ARG(ok, op, "mask has shape ", shape_str(mask.sizes()), ", which does not broadcast to scores' shape ",
                     shape_str(scores.sizes()));
}

/// \brief Causal attention needs sq <= sk (queries aligned to the end of the keys) and window >= 1.
inline void check_causal(const char* op, const at::Tensor& scores, std::optional<int64_t> window) {
  const int64_t sq = scores.size(-2), sk = scores.size(-1);
  MEGACORE_CHECK_ARG(sq <= sk, op, "scores has sq = ", sq, " > sk = ", sk, " (shape ", shape_str(scores.sizes()),
                     "); causal queries are aligned to the end of the keys, so sq <= sk");
  MEGACORE_CHECK_ARG(!window.has_value() || *window >= 1, op, "window is ", window.value_or(0),
                     ", expected >= 1 (or None for no window)");
}

/// \brief grad_out and probs of scaled_softmax_backward: float, same shape, dtype and device.
inline void check_softmax_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& probs) {
  check_float_tensor(op, "probs", probs);
  check_min_dim(op, "probs", probs, 1, "[..., sk]");
  check_same_dtype_device(op, "grad_out", grad_out, "probs", probs);
  check_same_shape(op, "grad_out", grad_out, "probs", probs);
}

constexpr int kMaxMaskDims = 6;

/// \brief Where each row of a mask broadcast to scores [rows, sk] starts: rows are numbered like scores'
///        leading dims, coalesced to at most kMaxMaskDims dims of (size, stride) with stride 0 on
///        broadcast dims; col_stride is 0 (one value per row) or 1.
struct MaskRows {
  at::Tensor mask;  // the bool storage the offsets point into
  int ndim = 0;
  int64_t sizes[kMaxMaskDims] = {};
  int64_t strides[kMaxMaskDims] = {};
  int64_t col_stride = 0;

  /// \brief Element offset of row `row`'s first key in `mask`.
  int64_t row_offset(int64_t row) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      off += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return off;
  }
};

/// \brief The layout of `mask` (checked by check_mask) read as if expanded to scores' shape. A mask whose
///        broadcast dims do not coalesce into kMaxMaskDims dims (rank > 7 or so) is materialized.
inline MaskRows mask_rows(const at::Tensor& mask, const at::Tensor& scores) {
  at::Tensor m = mask.dim() == 0 ? mask.reshape({1}) : mask;
  // Keys must be 1 apart (or all the same): a strided last dim is copied, which costs mask's size only.
  if (m.size(-1) != 1 && m.stride(-1) != 1) m = m.contiguous();
  at::Tensor e = m.expand(scores.sizes());  // strides 0 on broadcast dims, no copy
  for (int attempt = 0; attempt < 2; ++attempt) {
    MaskRows r;
    r.mask = e;
    r.col_stride = scores.size(-1) > 1 ? e.stride(-1) : 0;
    // Coalesce the leading dims from the innermost out: drop size-1 dims, merge an outer dim into the
    // inner one when it steps exactly over it.
    int64_t sizes[16], strides[16];  // scratch, innermost first
    int n = 0;
    bool fits = true;
    for (int64_t d = scores.dim() - 2; d >= 0 && fits; --d) {
      const int64_t size = e.size(d), stride = e.stride(d);
      if (size == 1) continue;
      if (n > 0 && stride == strides[n - 1] * sizes[n - 1]) {
        sizes[n - 1] *= size;
      } else if (n < kMaxMaskDims) {
        sizes[n] = size;
        strides[n] = stride;
        ++n;
      } else {
        fits = false;
      }
    }
    if (fits) {
      r.ndim = n;
      for (int i = 0; i < n; ++i) {  // stored outermost first
        r.sizes[i] = sizes[n - 1 - i];
        r.strides[i] = strides[n - 1 - i];
      }
      return r;
    }
    e = e.contiguous();  // rare: too many broadcast dims to index in place
  }
  TORCH_INTERNAL_ASSERT(false, "a contiguous mask always coalesces");
}

}  // namespace megacore::ops
