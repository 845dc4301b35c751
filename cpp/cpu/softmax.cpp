// CPU glue of the scaled softmax ops: checks, contiguity, allocation, then the kernel of the active ISA.
#include "cpu/softmax.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/softmax.h"

namespace megacore::cpu {
namespace {

at::Tensor scaled_masked_softmax(const at::Tensor& scores, const std::optional<at::Tensor>& mask, double scale) {
  ops::check_scores("scaled_masked_softmax", scores);
  if (mask.has_value()) ops::check_mask("scaled_masked_softmax", *mask, scores);
  const at::Tensor sc = scores.contiguous();
  at::Tensor out = at::empty_like(sc);
  if (mask.has_value()) {
    const ops::MaskRows rows = ops::mask_rows(*mask, sc);
    scaled_masked_softmax_forward_kernel()(sc, &rows, out, scale);
  } else {
    scaled_masked_softmax_forward_kernel()(sc, nullptr, out, scale);
  }
  return out;
}

at::Tensor scaled_causal_softmax(const at::Tensor& scores, double scale, std::optional<int64_t> window) {
  ops::check_scores("scaled_causal_softmax", scores);
  ops::check_causal("scaled_causal_softmax", scores, window);
  const at::Tensor sc = scores.contiguous();
  at::Tensor out = at::empty_like(sc);
  scaled_causal_softmax_forward_kernel()(sc, out, scale, window.value_or(0));
  return out;
}

at::Tensor scaled_softmax_backward(const at::Tensor& grad_out, const at::Tensor& probs, double scale) {
  ops::check_softmax_backward("scaled_softmax_backward", grad_out, probs);
  const at::Tensor gc = grad_out.contiguous(), pc = probs.contiguous();
  at::Tensor grad_scores = at::empty_like(pc);
  scaled_softmax_backward_kernel()(gc, pc, grad_scores, scale);
  return grad_scores;
}

}  // namespace
}  // namespace megacore::cpu

TORCH_LIBRARY_IMPL(megacore, CPU, m) {
  m.impl("scaled_masked_softmax", &megacore::cpu::scaled_masked_softmax);
  m.impl("scaled_causal_softmax", &megacore::cpu::scaled_causal_softmax);
  m.impl("scaled_softmax_backward", &megacore::cpu::scaled_softmax_backward);
}
