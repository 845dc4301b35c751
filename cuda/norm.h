#pragma once
// \brief CUDA launchers of layer_norm / rms_norm. x/out/grad are contiguous [rows, cols]; weight/bias are
//        [cols] or null; mean/rstd are [rows] in fp32 (fp64 for fp64). A null `mean` selects RMSNorm
//        (no centering, no bias).
#include "common.h"

namespace megacore::cuda {

/// \brief out = (x - mean) * rstd * weight + bias per row, rstd = 1 / sqrt(var + eps) (RMSNorm:
///        x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps)); writes mean (LayerNorm) and rstd.
cudaError_t norm_forward(const void* x, const void* weight, const void* bias, void* out, void* mean, void* rstd,
                         int64_t rows, int64_t cols, double eps, DType dtype, cudaStream_t stream);

/// \brief grad_x from the saved mean/rstd; grad_weight = column sums of grad_out * xhat and grad_bias =
///        column sums of grad_out, each written only when not null, using `partial`
///        ([2, column_partial_rows(rows), cols] of fp32, fp64 for fp64) as workspace.
cudaError_t norm_backward(const void* grad_out, const void* x, const void* weight, const void* mean,
                          const void* rstd, void* grad_x, void* grad_weight, void* grad_bias, void* partial,
                          int64_t rows, int64_t cols, DType dtype, cudaStream_t stream);

}  // namespace megacore::cuda
