#pragma once
// \brief CUDA launchers of bias_gelu. x/out/grad are contiguous [rows, cols]; bias is [cols] or null.
#include "common.h"

namespace megacore::cuda {

/// \brief out = gelu(x + bias), tanh approximation or exact erf.
cudaError_t bias_gelu_forward(const void* x, const void* bias, void* out, int64_t rows, int64_t cols, DType dtype,
                              bool tanh, cudaStream_t stream);

/// \brief grad_x = grad_out * gelu'(x + bias); if grad_bias is not null, grad_bias = column sums of
///        grad_x, using `partial` ([column_partial_rows(rows), cols] of fp32, fp64 for fp64) as workspace.
cudaError_t bias_gelu_backward(const void* grad_out, const void* x, const void* bias, void* grad_x, void* grad_bias,
                               void* partial, int64_t rows, int64_t cols, DType dtype, bool tanh,
                               cudaStream_t stream);

}  // namespace megacore::cuda
