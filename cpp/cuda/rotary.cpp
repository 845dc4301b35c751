// CUDA glue of apply_rotary_emb: checks (shared with the CPU glue), contiguity, cos/sin in the accumulation
// dtype, allocation, launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/glue.h"
#include "common/tensors.h"
#include "ops/rotary.h"
#include "rotary.h"  // cuda/rotary.h

namespace megacore::cuda_glue {
namespace {

at::Tensor rotary(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& cos,
                  const at::Tensor& sin, bool backward) {
  const int64_t r = ops::check_rotary(op, x_name, x, cos, sin);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  // cos/sin [seq, rotary_dim] are small: converting them costs little next to x.
  const auto acc = acc_dtype(x);
  const at::Tensor cc = cos.to(acc).contiguous(), sc = sin.to(acc).contiguous();
  at::Tensor out = at::empty_like(xc);
  // x [seq, ..., d] -> [seq, inner, d]
  const int64_t seq = x.size(0), d = x.size(-1);
  const int64_t inner = seq * d == 0 ? 0 : x.numel() / (seq * d);
  MEGACORE_CUDA_CHECK(op, cuda::apply_rotary_emb(xc.const_data_ptr(), cc.const_data_ptr(), sc.const_data_ptr(),
                                                 out.mutable_data_ptr(), seq, inner, d, r, dtype_of(x), backward,
                                                 stream_of(x)));
  return out;
}

at::Tensor apply_rotary_emb(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rotary("apply_rotary_emb", "x", x, cos, sin, false);
}

at::Tensor apply_rotary_emb_backward(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin) {
  return rotary("apply_rotary_emb_backward", "grad_out", grad_out, cos, sin, true);
}

}  // namespace
}  // namespace megacore::cuda_glue

TORCH_LIBRARY_IMPL(megacore, CUDA, m) {
  m.impl("apply_rotary_emb", &megacore::cuda_glue::apply_rotary_emb);
  m.impl("apply_rotary_emb_backward", &megacore::cuda_glue::apply_rotary_emb_backward);
}
