// CUDA glue of bias_dropout_add: checks (shared with the CPU glue; the seed is a CPU tensor read on the
// host, no sync), contiguity, allocation, launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/glue.h"
#include "dropout.h"  // cuda/dropout.h
#include "common/tensors.h"
#include "ops/dropout.h"

namespace megacore::cuda_glue {
namespace {

at::Tensor bias_dropout_add(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor& residual,
                            double p, const at::Tensor& seed) {
  const int64_t s = ops::check_bias_dropout_add("bias_dropout_add", x, bias, residual, p, seed);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  const at::Tensor bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty_like(xc);
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  MEGACORE_CUDA_CHECK("bias_dropout_add",
                      cuda::bias_dropout_add_forward(xc.const_data_ptr(), ptr_or_null(bc), rc.const_data_ptr(),
                                                     out.mutable_data_ptr(), rows, cols, p, s, dtype_of(x),
                                                     stream_of(x)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_add_backward(const at::Tensor& grad_out, double p,
                                                             const at::Tensor& seed, bool has_bias) {
  const int64_t s = ops::check_bias_dropout_add_backward("bias_dropout_add_backward", grad_out, p, seed);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor gc = grad_out.contiguous();
  const int64_t cols = gc.size(-1), rows = cols ? gc.numel() / cols : 0;
  at::Tensor grad_x = at::empty_like(gc);
  at::Tensor grad_bias = at::empty({has_bias ? cols : 0}, gc.options());
  at::Tensor partial;
  if (has_bias) {
    if (rows == 0) grad_bias.zero_();
    partial = at::empty({cuda::column_partial_rows(rows), cols},
                        gc.options().dtype(acc_dtype(gc)));
  }
  MEGACORE_CUDA_CHECK("bias_dropout_add_backward",
                      cuda::bias_dropout_add_backward(gc.const_data_ptr(), grad_x.mutable_data_ptr(),
                                                      has_bias ? grad_bias.mutable_data_ptr() : nullptr,
                                                      mutable_ptr_or_null(partial), rows, cols, p, s,
                                                      dtype_of(gc), stream_of(gc)));
  return {grad_x, grad_bias};
}

}  // namespace
}  // namespace megacore::cuda_glue

TORCH_LIBRARY_IMPL(megacore, CUDA, m) {
  m.impl("bias_dropout_add", &megacore::cuda_glue::bias_dropout_add);
  m.impl("bias_dropout_add_backward", &megacore::cuda_glue::bias_dropout_add_backward);
}
