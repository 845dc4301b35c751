#pragma once
// \brief CPU kernels of bias_dropout_add (cpp/cpu/kernels/dropout.cpp). Tensors are contiguous, viewed as
//        [rows, cols] with cols the last dim; `bias` may be undefined. The keep mask is Philox-4x32-10 of
//        (seed, element index), see cuda/philox.h; p == 0 draws nothing.
#include <ATen/core/Tensor.h>

#include "common/isa.h"

// out = residual + keep * (x + bias) / (1 - p)
MEGACORE_CPU_KERNEL(bias_dropout_add_forward, void(const at::Tensor& x, const at::Tensor& bias,
                                                   const at::Tensor& residual, const at::Tensor& out, double p,
                                                   int64_t seed))
// grad_x = grad_out * keep / (1 - p); grad_bias (fp32/fp64 accumulation, [cols]) = column sums of grad_x,
// written only when defined.
MEGACORE_CPU_KERNEL(bias_dropout_add_backward, void(const at::Tensor& grad_out, const at::Tensor& grad_x,
                                                    const at::Tensor& grad_bias, double p, int64_t seed))
