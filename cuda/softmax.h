#pragma once
// \brief CUDA launchers of the scaled softmax ops. scores/out/grad are contiguous [rows, sk]; softmax runs
//        over sk in fp32 (fp64 for fp64) and a row with no visible key is zeros.
#include "common.h"

namespace megacore::cuda {

constexpr int kMaxMaskDims = 6;

/// \brief Where the mask of row r starts: r is split over `sizes` (outermost first, row-major like
///        scores' leading dims) and offset = sum(index[d] * strides[d]); keys are col_stride (0 or 1) apart.
struct MaskLayout {
  int ndim = 0;
  int64_t sizes[kMaxMaskDims] = {};
  int64_t strides[kMaxMaskDims] = {};
  int64_t col_stride = 0;
};

/// \brief out = softmax(scale * scores) with keys excluded where `mask` (bool, laid out by `layout`) is
///        true; mask may be null (no mask).
cudaError_t scaled_masked_softmax_forward(const void* scores, const bool* mask, const MaskLayout& layout, void* out,
                                          int64_t rows, int64_t sk, double scale, DType dtype, cudaStream_t stream);

/// \brief Causal softmax: row r is query i = r % sq and sees keys (i + sk - sq - window, i + sk - sq];
///        window <= 0 means unlimited. Needs sq <= sk.
cudaError_t scaled_causal_softmax_forward(const void* scores, void* out, int64_t rows, int64_t sq, int64_t sk,
                                          int64_t window, double scale, DType dtype, cudaStream_t stream);

/// \brief grad_scores = scale * probs * (grad_out - sum(grad_out * probs, -1)).
cudaError_t scaled_softmax_backward(const void* grad_out, const void* probs, void* grad_scores, int64_t rows,
                                    int64_t sk, double scale, DType dtype, cudaStream_t stream);

}  // namespace megacore::cuda
