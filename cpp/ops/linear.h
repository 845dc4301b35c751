#pragma once
// \brief megacore's linear: y = x @ w^T (+ bias), x [..., in], w [out, in], bias [out] -> [..., out]. A few rows on
//        CPU (decoding) run the skinny-linear kernel (kernels/linear.h); anything else is ATen's linear. The
//        transformer layer's GEMMs and the LM head in decoding call it; torch.ops.megacore.linear is the op.
#include <ATen/ATen.h>

#include <optional>

namespace megacore::ops {

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

/// \brief Whether linear(x, w, bias) runs the skinny-linear kernel (else ATen's linear): CPU, a contiguous weight,
///        and a number of rows where the kernel was measured faster: 4-15 in fp32, 1-4 in bf16, 1-8 in fp16.
bool uses_skinny_linear(const at::Tensor& x, const at::Tensor& w);

}  // namespace megacore::ops
