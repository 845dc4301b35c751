// CPU glue of apply_rotary_emb: checks, contiguity, cos/sin in the accumulation dtype, allocation, then
// the kernel of the active ISA.
#include "cpu/rotary.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/tensors.h"
#include "ops/rotary.h"

namespace megacore::cpu {
namespace {

at::Tensor rotary(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& cos,
                  const at::Tensor& sin, bool backward) {
  ops::check_rotary(op, x_name, x, cos, sin);
  const at::Tensor xc = x.contiguous();
  // cos/sin [seq, rotary_dim] are small: converting them costs nothing next to x.
  const auto acc = acc_dtype(x);
  const at::Tensor cc = cos.to(acc).contiguous(), sc = sin.to(acc).contiguous();
  at::Tensor out = at::empty_like(xc);
  rotary_emb_kernel()(xc, cc, sc, out, backward);
  return out;
}

at::Tensor apply_rotary_emb(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rotary("apply_rotary_emb", "x", x, cos, sin, false);
}

at::Tensor apply_rotary_emb_backward(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin) {
  return rotary("apply_rotary_emb_backward", "grad_out", grad_out, cos, sin, true);
}

}  // namespace
}  // namespace megacore::cpu

TORCH_LIBRARY_IMPL(megacore, CPU, m) {
  m.impl("apply_rotary_emb", &megacore::cpu::apply_rotary_emb);
  m.impl("apply_rotary_emb_backward", &megacore::cpu::apply_rotary_emb_backward);
}
