// CUDA glue of the scaled softmax ops: checks (shared with the CPU glue), contiguity, the mask's row
// layout, allocation, launch on the current stream.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/glue.h"
#include "ops/softmax.h"
#include "softmax.h"  // cuda/softmax.h

namespace megacore::cuda_glue {
namespace {

static_assert(ops::kMaxMaskDims == cuda::kMaxMaskDims, "the CPU and CUDA mask layouts must agree");

at::Tensor scaled_masked_softmax(const at::Tensor& scores, const std::optional<at::Tensor>& mask, double scale) {
  ops::check_scores("scaled_masked_softmax", scores);
  if (mask.has_value()) ops::check_mask("scaled_masked_softmax", *mask, scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor sc = scores.contiguous();
  at::Tensor out = at::empty_like(sc);
  const int64_t sk = sc.size(-1), rows = sk ? sc.numel() / sk : 0;
  ops::MaskRows rows_layout;
  cuda::MaskLayout layout;
  if (mask.has_value()) {
    rows_layout = ops::mask_rows(*mask, sc);
    layout.ndim = rows_layout.ndim;
    for (int d = 0; d < rows_layout.ndim; ++d) {
      layout.sizes[d] = rows_layout.sizes[d];
      layout.strides[d] = rows_layout.strides[d];
    }
    layout.col_stride = rows_layout.col_stride;
  }
  const bool* mp = mask.has_value() ? rows_layout.mask.const_data_ptr<bool>() : nullptr;
  MEGACORE_CUDA_CHECK("scaled_masked_softmax",
                      cuda::scaled_masked_softmax_forward(sc.const_data_ptr(), mp, layout, out.mutable_data_ptr(), rows,
                                                          sk, scale, dtype_of(sc), stream_of(sc)));
  return out;
}

at::Tensor scaled_causal_softmax(const at::Tensor& scores, double scale, std::optional<int64_t> window) {
  ops::check_scores("scaled_causal_softmax", scores);
  ops::check_causal("scaled_causal_softmax", scores, window);
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor sc = scores.contiguous();
  at::Tensor out = at::empty_like(sc);
  const int64_t sq = sc.size(-2), sk = sc.size(-1), rows = sk ? sc.numel() / sk : 0;
  MEGACORE_CUDA_CHECK("scaled_causal_softmax",
                      cuda::scaled_causal_softmax_forward(sc.const_data_ptr(), out.mutable_data_ptr(), rows, sq, sk,
                                                          window.value_or(0), scale, dtype_of(sc), stream_of(sc)));
  return out;
}

at::Tensor scaled_softmax_backward(const at::Tensor& grad_out, const at::Tensor& probs, double scale) {
  ops::check_softmax_backward("scaled_softmax_backward", grad_out, probs);
  const c10::cuda::CUDAGuard guard(probs.device());
  const at::Tensor gc = grad_out.contiguous(), pc = probs.contiguous();
  at::Tensor grad_scores = at::empty_like(pc);
  const int64_t sk = pc.size(-1), rows = sk ? pc.numel() / sk : 0;
  MEGACORE_CUDA_CHECK("scaled_softmax_backward",
                      cuda::scaled_softmax_backward(gc.const_data_ptr(), pc.const_data_ptr(),
                                                    grad_scores.mutable_data_ptr(), rows, sk, scale, dtype_of(pc),
                                                    stream_of(pc)));
  return grad_scores;
}

}  // namespace
}  // namespace megacore::cuda_glue

TORCH_LIBRARY_IMPL(megacore, CUDA, m) {
  m.impl("scaled_masked_softmax", &megacore::cuda_glue::scaled_masked_softmax);
  m.impl("scaled_causal_softmax", &megacore::cuda_glue::scaled_causal_softmax);
  m.impl("scaled_softmax_backward", &megacore::cuda_glue::scaled_softmax_backward);
}
