#pragma once
// \brief CPU kernels of bias_gelu (cpp/cpu/kernels/gelu.cpp). Tensors are contiguous, viewed as
//        [rows, cols] with cols the last dim; `bias` may be undefined.
#include <ATen/core/Tensor.h>

#include "common/isa.h"

MEGACORE_CPU_KERNEL(bias_gelu_forward,
                    void(const at::Tensor& x, const at::Tensor& bias, const at::Tensor& out, bool tanh))
// grad_bias (fp32/fp64 accumulation, [cols]) is written only when defined.
MEGACORE_CPU_KERNEL(bias_gelu_backward, void(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bias,
                                             const at::Tensor& grad_x, const at::Tensor& grad_bias, bool tanh))
