#pragma once
// \brief CPU kernels of the scaled softmax ops (cpp/cpu/kernels/softmax.cpp). scores/out/grad tensors are
//        contiguous, viewed as [rows, sk] with sk the last dim.
#include <ATen/core/Tensor.h>

#include "common/isa.h"
#include "ops/softmax.h"

// out = softmax(scale * scores) with keys excluded where the mask is True (mask may be null: no mask).
MEGACORE_CPU_KERNEL(scaled_masked_softmax_forward, void(const at::Tensor& scores, const megacore::ops::MaskRows* mask,
                                                        const at::Tensor& out, double scale))
// Causal: row r is query i = r % sq and sees keys [max(0, i + sk - sq - window + 1), i + sk - sq]; window <= 0
// means no window.
MEGACORE_CPU_KERNEL(scaled_causal_softmax_forward,
                    void(const at::Tensor& scores, const at::Tensor& out, double scale, int64_t window))
// grad_scores = scale * probs * (grad_out - sum(grad_out * probs, -1)).
MEGACORE_CPU_KERNEL(scaled_softmax_backward,
                    void(const at::Tensor& grad_out, const at::Tensor& probs, const at::Tensor& grad_scores,
                         double scale))
