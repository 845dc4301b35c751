#pragma once
// \brief megacore's linear: y = x @ w^T (+ bias), x [..., in], w [out, in], bias [out] -> [..., out]. A few rows on
//        CPU (decoding) run the skinny-linear kernel (kernels/linear.h); anything else is ATen's linear. The
//        transformer layer's GEMMs and the LM head in decoding call it; torch.ops.megacore.linear is the op.
#include <ATen/ATen.h>

#include <optional>

namespace megacore::ops {

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

/// \brief Whether linear(x, w, bias) runs the skinny-linear kernel (else ATen's linear): CPU, fp32/bf16/fp16,
///        1 to kernels::kSkinnyLinearMaxRows rows, a contiguous weight.
bool uses_skinny_linear(const at::Tensor& x, const at::Tensor& w);

}  // namespace megacore::ops
