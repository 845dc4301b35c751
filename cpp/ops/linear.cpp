// The linear op: y = x @ w^T (+ bias). Checks, the choice between the skinny-linear CPU kernel and ATen's linear,
// and the registration (CPU and CUDA; CUDA always takes ATen's GEMM).
#include "ops/linear.h"

#include "common/profiling.h"
#include "kernels/linear.h"
#include "ops/op.h"

#include <utility>

namespace megacore::ops {

namespace {

/// The rows of x for which the skinny-linear kernel beat ATen's linear, by dtype (docs/benchmarks.md, "Skinny
/// linear": cold weights of gpt2's sizes, 2 Sapphire Rapids cores): fp32 from 4 to 15 rows (1.1-2.5x; ATen's GEMV
/// is as fast at 1-3 rows, its blocked GEMM at 16); bf16 from 1 to 4 (1.1-1.5x; from 8 rows oneDNN's AMX kernels
/// win); fp16 from 1 to 8 (1.2-1.9x).
std::pair<int64_t, int64_t> skinny_rows(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return {4, 15};
    case at::kBFloat16: return {1, 4};
    case at::kHalf: return {1, 8};
    default: return {1, 0};  // none
  }
}

}  // namespace

bool uses_skinny_linear(const at::Tensor& x, const at::Tensor& w) {
  if (!x.is_cpu() || !w.is_contiguous()) return false;
  const int64_t in = x.size(-1);
  const int64_t rows = in == 0 ? 0 : x.numel() / in;
  const auto [lo, hi] = skinny_rows(x.scalar_type());
  static_assert(kernels::kSkinnyLinearMaxRows >= 15);
  return rows >= lo && rows <= hi;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "linear";
  check_float_tensor(op, "input", x);
  check_min_dim(op, "input", x, 1, "[..., in_features]");
  check_same_dtype_device(op, "weight", w, "input", x);
  MEGACORE_CHECK_ARG(w.dim() == 2 && w.size(1) == x.size(-1), op, "weight has shape ", shape_str(w.sizes()),
                     ", expected [out_features, ", x.size(-1), "] (in_features = input.size(-1))");
  if (bias.has_value()) {
    check_same_dtype_device(op, "bias", *bias, "input", x);
    check_vector(op, "bias", *bias, w.size(0), "out_features = weight.size(0)");
  }
  if (!uses_skinny_linear(x, w)) return at::linear(x, w, bias);
  const int64_t in = x.size(-1), out = w.size(0), rows = x.numel() / in;
  const at::Tensor xf = x.reshape({rows, in}).to(at::kFloat).contiguous();  // at most 16 rows: cheap
  const at::Tensor b = contiguous_or_undefined(bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  const kernels::SkinnyLinear p{xf.const_data_ptr<float>(), w.const_data_ptr(), ptr_or_null(b), y.mutable_data_ptr(),
                                rows, in, out, dtype_of(x)};
  const ProfilePhase phase("megacore.linear.skinny");  // which path ran, for a profile (and the tests)
  cpu::skinny_linear_kernel()(p);
  return y;
}

namespace {
void register_kernels(torch::Library& m) { m.impl("linear", &linear); }
}  // namespace

}  // namespace megacore::ops

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  // ---- linear: x [..., in] @ weight [out, in]^T + bias [out]; the skinny-linear kernel for 1-16 CPU rows ----
  megacore::ops::define_op(m, "linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
}

MEGACORE_REGISTER_KERNELS(megacore::ops::register_kernels)
