#pragma once
// \brief CPU kernels of layer_norm / rms_norm (cpp/cpu/kernels/norm.cpp). Tensors are contiguous, x viewed
//        as [rows, cols] with cols the last dim; mean/rstd are [rows] in the accumulation type (fp32, fp64
//        for fp64). An undefined `mean` selects RMSNorm (no centering, no bias); weight/bias may be undefined.
#include <ATen/core/Tensor.h>

#include "common/isa.h"

// Writes out ([rows, cols], x's dtype), mean (LayerNorm only) and rstd ([rows]).
MEGACORE_CPU_KERNEL(norm_forward, void(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                       const at::Tensor& out, const at::Tensor& mean, const at::Tensor& rstd,
                                       double eps))
// Writes grad_x ([rows, cols], x's dtype) and, when defined, grad_weight / grad_bias ([cols], accumulation
// type): deterministic column sums of grad_out * xhat and grad_out.
MEGACORE_CPU_KERNEL(norm_backward, void(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_x,
                                        const at::Tensor& grad_weight, const at::Tensor& grad_bias))
