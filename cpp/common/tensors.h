#pragma once
// \brief Small tensor helpers shared by the CPU and CUDA glue (not by the per-ISA kernels).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <optional>

namespace megacore {

/// \brief t.contiguous(), or an undefined tensor for None (kernels take undefined = absent).
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

/// \brief The dtype megacore accumulates x's dtype in: fp32, or fp64 for fp64.
inline at::ScalarType acc_dtype(const at::Tensor& x) { return at::toOpMathType(x.scalar_type()); }

/// \brief Rows of x viewed as [rows, x.size(-1)]: the product of the leading dims.
inline int64_t rows_of(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

/// \brief Per-row statistics: [x.shape[:-1]] in the accumulation dtype.
inline at::Tensor empty_row_stats(const at::Tensor& x) {
  return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x)));
}

/// \brief A [x.size(-1)] accumulation-dtype buffer for a parameter gradient the kernel sums into when
///        `wanted`; else undefined.
inline at::Tensor empty_param_grad_acc(const at::Tensor& x, bool wanted) {
  return wanted ? at::empty({x.size(-1)}, x.options().dtype(acc_dtype(x))) : at::Tensor();
}

/// \brief The parameter gradient in x's dtype from its accumulation buffer, or the empty [0] tensor the
///        schemas return for a parameter that was None.
inline at::Tensor finish_param_grad(const at::Tensor& acc, const at::Tensor& x) {
  return acc.defined() ? acc.to(x.scalar_type()) : at::empty({0}, x.options());
}

}  // namespace megacore
