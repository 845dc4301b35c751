#pragma once
// \brief CUDA launchers of bias_dropout_add. x/residual/out/grad are contiguous [rows, cols]; bias is [cols]
//        or null. The keep mask of element e is Philox-4x32-10 of (seed, e) (cuda/philox.h), the same on CPU.
#include "common.h"

namespace megacore::cuda {

/// \brief out = residual + keep * (x + bias) / (1 - p); p == 0 draws nothing.
cudaError_t bias_dropout_add_forward(const void* x, const void* bias, const void* residual, void* out, int64_t rows,
                                     int64_t cols, double p, int64_t seed, DType dtype, cudaStream_t stream);

/// \brief grad_x = grad_out * keep / (1 - p); if grad_bias is not null, grad_bias = column sums of grad_x,
///        using `partial` ([column_partial_rows(rows), cols] of fp32, fp64 for fp64) as workspace.
cudaError_t bias_dropout_add_backward(const void* grad_out, void* grad_x, void* grad_bias, void* partial,
                                      int64_t rows, int64_t cols, double p, int64_t seed, DType dtype,
                                      cudaStream_t stream);

}  // namespace megacore::cuda
