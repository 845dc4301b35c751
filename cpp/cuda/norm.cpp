// CUDA glue of layer_norm / rms_norm: checks (shared with the CPU glue), contiguity, allocation, launch on
// the current stream.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/glue.h"
#include "norm.h"  // cuda/norm.h
#include "ops/norm.h"
#include "common/tensors.h"

namespace megacore::cuda_glue {
namespace {

/// Shared by both backward ops: grad_x, and the parameter gradients ([cols] of x's dtype, or [0] when not
/// wanted), from one launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(const char* op, const at::Tensor& grad_out,
                                                             const at::Tensor& x,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& mean, const at::Tensor& rstd,
                                                             bool has_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous(), wc = contiguous_or_undefined(weight);
  const at::Tensor mc = mean.defined() ? mean.contiguous() : at::Tensor(), rc = rstd.contiguous();
  const int64_t cols = x.size(-1), rows = rows_of(x);
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_weight = at::empty({weight.has_value() ? cols : 0}, x.options());
  at::Tensor grad_bias = at::empty({has_bias ? cols : 0}, x.options());
  at::Tensor partial;
  if (weight.has_value() || has_bias) {
    if (rows == 0) {
      grad_weight.zero_();
      grad_bias.zero_();
    }
    partial = at::empty({2, cuda::column_partial_rows(rows), cols}, x.options().dtype(acc_dtype(x)));
  }
  MEGACORE_CUDA_CHECK(op, cuda::norm_backward(gc.const_data_ptr(), xc.const_data_ptr(), ptr_or_null(wc), ptr_or_null(mc),
                                              rc.const_data_ptr(), grad_x.mutable_data_ptr(),
                                              weight.has_value() ? grad_weight.mutable_data_ptr() : nullptr,
                                              has_bias ? grad_bias.mutable_data_ptr() : nullptr,
                                              mutable_ptr_or_null(partial), rows, cols, dtype_of(x), stream_of(x)));
  return {grad_x, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias, double eps) {
  ops::check_norm_input("layer_norm", x, weight, bias);
  ops::check_eps("layer_norm", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = contiguous_or_undefined(weight), bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty_like(xc), mean = empty_row_stats(x), rstd = empty_row_stats(x);
  MEGACORE_CUDA_CHECK("layer_norm", cuda::norm_forward(xc.const_data_ptr(), ptr_or_null(wc), ptr_or_null(bc),
                                                       out.mutable_data_ptr(), mean.mutable_data_ptr(),
                                                       rstd.mutable_data_ptr(), rows_of(x), x.size(-1), eps,
                                                       dtype_of(x), stream_of(x)));
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool has_bias) {
  ops::check_norm_backward("layer_norm_backward", grad_out, x, weight, &mean, rstd);
  return norm_backward("layer_norm_backward", grad_out, x, weight, mean, rstd, has_bias);
}

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight, double eps) {
  ops::check_norm_input("rms_norm", x, weight, std::nullopt);
  ops::check_eps("rms_norm", eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), wc = contiguous_or_undefined(weight);
  at::Tensor out = at::empty_like(xc), rstd = empty_row_stats(x);
  MEGACORE_CUDA_CHECK("rms_norm", cuda::norm_forward(xc.const_data_ptr(), ptr_or_null(wc), nullptr,
                                                     out.mutable_data_ptr(), nullptr, rstd.mutable_data_ptr(),
                                                     rows_of(x), x.size(-1), eps, dtype_of(x), stream_of(x)));
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  ops::check_norm_backward("rms_norm_backward", grad_out, x, weight, nullptr, rstd);
  auto [grad_x, grad_weight, grad_bias] = norm_backward("rms_norm_backward", grad_out, x, weight, at::Tensor(), rstd,
                                                        false);
  return {grad_x, grad_weight};
}

}  // namespace
}  // namespace megacore::cuda_glue

TORCH_LIBRARY_IMPL(megacore, CUDA, m) {
  m.impl("layer_norm", &megacore::cuda_glue::layer_norm);
  m.impl("layer_norm_backward", &megacore::cuda_glue::layer_norm_backward);
  m.impl("rms_norm", &megacore::cuda_glue::rms_norm);
  m.impl("rms_norm_backward", &megacore::cuda_glue::rms_norm_backward);
}
