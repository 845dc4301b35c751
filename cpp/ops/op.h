#pragma once
// \brief What an op family file (cpp/ops/<family>.cpp) is written with: the schema with its device check
//        (define_op), tensor -> kernel-parameter helpers, and launch(), which runs a kernel declared with
//        MEGACORE_KERNEL on the device of the op's tensors: the CPU kernel of the active ISA, or the CUDA
//        launcher on the current stream (CUDA builds). One implementation of an op serves both devices and
//        is registered for both with MEGACORE_REGISTER_KERNELS.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>

#include "common/checks.h"
#include "kernels/common.h"

#ifdef MEGACORE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace megacore::ops {

/// \brief Defines an op from its schema and registers its device check at BackendSelect, which runs before
///        a kernel is picked from the tensors' devices: every tensor must be on the first one's device (an
///        argument named `seed` is a host value and stays on CPU). cpp/common/library.cpp.
void define_op(torch::Library& m, const char* schema);

/// \brief The kernels' DType of a tensor the checks accepted (check_float_tensor).
inline kernels::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kDouble: return kernels::DType::kFloat64;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "megacore: no kernel for dtype ", t.scalar_type());
  }
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
inline void* mutable_ptr_or_null(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

/// \brief t.contiguous(), or an undefined tensor for None (kernels take null = absent).
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

/// \brief A parameter gradient: [cols] of x's dtype when the parameter was given, else the empty [0] the
///        schemas return for a None parameter. Zeroed when there are no rows to sum (kernels do not run on
///        empty input).
inline at::Tensor empty_param_grad(const at::Tensor& x, bool wanted, int64_t rows) {
  at::Tensor g = at::empty({wanted ? x.size(-1) : 0}, x.options());
  if (wanted && rows == 0) g.zero_();
  return g;
}

/// \brief The workspace of `sums` column sums over [rows, cols] a CUDA kernel needs
///        ([sums, column_partial_rows(rows), cols], accumulation dtype); undefined on CPU or when no sum is
///        wanted.
inline at::Tensor column_workspace(const at::Tensor& x, bool wanted, int64_t sums, int64_t rows, int64_t cols) {
  if (!wanted || !x.is_cuda()) return at::Tensor();
  return at::empty({sums, kernels::column_partial_rows(rows), cols}, x.options().dtype(acc_dtype(x)));
}

#ifdef MEGACORE_WITH_CUDA
template <typename P>
void launch(const char* op, const at::Tensor& on, const P& params, void (*cpu)(const P&),
            cudaError_t (*cuda)(const P&, cudaStream_t)) {
  if (on.is_cuda()) {
    const cudaError_t err = cuda(params, c10::cuda::getCurrentCUDAStream(on.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "megacore.", op, ": CUDA error: ", cudaGetErrorString(err));
    return;
  }
  TORCH_INTERNAL_ASSERT(on.is_cpu(), "megacore.", op, ": no kernel for device ", on.device());
  cpu(params);
}
#define MEGACORE_LAUNCH(op, name, on, params) \
  ::megacore::ops::launch(op, on, params, ::megacore::cpu::name##_kernel(), &::megacore::cuda::name)
#else
template <typename P>
void launch(const char* op, const at::Tensor& on, const P& params, void (*cpu)(const P&)) {
  TORCH_INTERNAL_ASSERT(on.is_cpu(), "megacore.", op, ": no kernel for device ", on.device());
  cpu(params);
}
/// MEGACORE_LAUNCH(op, name, on, params): runs kernel `name` (MEGACORE_KERNEL) with `params` on the device
/// of tensor `on`; a CUDA error raises, naming the op. The caller holds a device guard for `on`.
#define MEGACORE_LAUNCH(op, name, on, params) \
  ::megacore::ops::launch(op, on, params, ::megacore::cpu::name##_kernel())
#endif

}  // namespace megacore::ops

/// MEGACORE_REGISTER_KERNELS(fn): registers fn(torch::Library&), which m.impl()s a family's ops, for CPU and,
/// in CUDA builds, for CUDA. Use once per family file, at global scope.
#ifdef MEGACORE_WITH_CUDA
#define MEGACORE_REGISTER_KERNELS(fn)         \
  TORCH_LIBRARY_IMPL(megacore, CPU, m) { fn(m); } \
  TORCH_LIBRARY_IMPL(megacore, CUDA, m) { fn(m); }
#else
#define MEGACORE_REGISTER_KERNELS(fn) \
  TORCH_LIBRARY_IMPL(megacore, CPU, m) { fn(m); }
#endif
