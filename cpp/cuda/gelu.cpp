// CUDA glue of bias_gelu: checks (shared with the CPU glue), contiguity, allocation, launch on the
// current stream.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/glue.h"
#include "gelu.h"  // cuda/gelu.h
#include "common/tensors.h"
#include "ops/gelu.h"

namespace megacore::cuda_glue {
namespace {

at::Tensor bias_gelu(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view approximate) {
  const bool tanh = ops::check_bias_gelu("bias_gelu", x, bias, approximate);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = contiguous_or_undefined(bias);
  at::Tensor out = at::empty_like(xc);
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  MEGACORE_CUDA_CHECK("bias_gelu", cuda::bias_gelu_forward(xc.const_data_ptr(), ptr_or_null(bc), out.mutable_data_ptr(),
                                                           rows, cols, dtype_of(x), tanh, stream_of(x)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::string_view approximate) {
  const bool tanh = ops::check_bias_gelu("bias_gelu_backward", x, bias, approximate);
  check_same_dtype_device("bias_gelu_backward", "grad_out", grad_out, "x", x);
  check_same_shape("bias_gelu_backward", "grad_out", grad_out, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), gc = grad_out.contiguous();
  const at::Tensor bc = contiguous_or_undefined(bias);
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_bias = at::empty({bias.has_value() ? cols : 0}, x.options());
  at::Tensor partial;
  if (bias.has_value()) {
    if (rows == 0) grad_bias.zero_();
    partial = at::empty({cuda::column_partial_rows(rows), cols}, x.options().dtype(acc_dtype(x)));
  }
  MEGACORE_CUDA_CHECK("bias_gelu_backward",
                      cuda::bias_gelu_backward(gc.const_data_ptr(), xc.const_data_ptr(), ptr_or_null(bc),
                                               grad_x.mutable_data_ptr(),
                                               bias.has_value() ? grad_bias.mutable_data_ptr() : nullptr,
                                               mutable_ptr_or_null(partial), rows, cols, dtype_of(x), tanh,
                                               stream_of(x)));
  return {grad_x, grad_bias};
}

}  // namespace
}  // namespace megacore::cuda_glue

TORCH_LIBRARY_IMPL(megacore, CUDA, m) {
  m.impl("bias_gelu", &megacore::cuda_glue::bias_gelu);
  m.impl("bias_gelu_backward", &megacore::cuda_glue::bias_gelu_backward);
}
