// The rotary family: apply_rotary_emb (rotate-half pairing) and its backward. Schemas, argument checks,
// allocation, and the CPU and CUDA registrations; the kernel is kernels/rotary.h's.
#include "kernels/rotary.h"

#include "ops/op.h"

namespace megacore::ops {
namespace {

/// \brief Checks x ([seq, ..., head_dim]; named `x_name`) and cos/sin ([seq, rotary_dim], float32 or x's
///        dtype); returns rotary_dim.
int64_t check_rotary(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& cos,
                     const at::Tensor& sin) {
  check_float_tensor(op, x_name, x);
  check_float_tensor(op, "cos", cos);
  check_float_tensor(op, "sin", sin);
  check_min_dim(op, x_name, x, 2, "[seq, ..., head_dim]");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    MEGACORE_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == x.scalar_type(), op, name,
                        " has dtype ", t.scalar_type(), ", expected Float or ", x.scalar_type(), " (the dtype of ",
                        x_name, ")");
    check_same_device(op, name, t, x_name, x);
  }
  MEGACORE_CHECK_ARG(cos.dim() == 2 && cos.size(0) == x.size(0), op, "cos has shape ", shape_str(cos.sizes()),
                     ", expected [", x.size(0), ", rotary_dim] (seq = ", x_name, ".size(0))");
  check_same_shape(op, "sin", sin, "cos", cos);
  const int64_t r = cos.size(1), head_dim = x.size(-1);
  MEGACORE_CHECK_ARG(r > 0 && r % 2 == 0 && r <= head_dim, op, "rotary_dim (cos.size(1)) is ", r,
                     ", expected a positive even number <= head_dim (", head_dim, ")");
  return r;
}

/// \brief Shared by the forward (x) and the backward (grad_out, backward = true).
at::Tensor rotary(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& cos,
                  const at::Tensor& sin, bool backward) {
  const int64_t r = check_rotary(op, x_name, x, cos, sin);
  const at::OptionalDeviceGuard guard(at::device_of(x));
  const at::Tensor xc = x.contiguous();
  // cos/sin [seq, rotary_dim] are small: converting them costs little next to x.
  const auto acc = acc_dtype(x);
  const at::Tensor cc = cos.to(acc).contiguous(), sc = sin.to(acc).contiguous();
  at::Tensor out = at::empty_like(xc);
  // x [seq, ..., d] -> [seq, inner, d]
  const int64_t seq = x.size(0), d = x.size(-1);
  const int64_t inner = seq * d == 0 ? 0 : x.numel() / (seq * d);
  const kernels::RotaryEmb p{xc.const_data_ptr(), cc.const_data_ptr(), sc.const_data_ptr(), out.mutable_data_ptr(),
                             seq, inner, d, r, dtype_of(x), backward};
  MEGACORE_LAUNCH(op, rotary_emb, x, p);
  return out;
}

at::Tensor apply_rotary_emb(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rotary("apply_rotary_emb", "x", x, cos, sin, false);
}

at::Tensor apply_rotary_emb_backward(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin) {
  return rotary("apply_rotary_emb_backward", "grad_out", grad_out, cos, sin, true);
}

void register_kernels(torch::Library& m) {
  m.impl("apply_rotary_emb", &apply_rotary_emb);
  m.impl("apply_rotary_emb_backward", &apply_rotary_emb_backward);
}

}  // namespace
}  // namespace megacore::ops

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  // ---- rotary position embedding, rotate-half pairing, x [seq, ..., head_dim], cos/sin [seq, rot] ----
  megacore::ops::define_op(m, "apply_rotary_emb(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  megacore::ops::define_op(m, "apply_rotary_emb_backward(Tensor grad_out, Tensor cos, Tensor sin) -> Tensor");
}

MEGACORE_REGISTER_KERNELS(megacore::ops::register_kernels)
