#pragma once
// \brief Helpers of the CUDA torch glue (cpp/cuda/*.cpp): torch dtype -> launcher dtype, the current
//        stream, and turning a launcher's cudaError_t into an error that names the op.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common.h"  // cuda/common.h: DType, column_partial_rows

namespace megacore::cuda_glue {

inline cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "megacore: no CUDA kernel for dtype ", t.scalar_type());
  }
}

inline cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

inline const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
inline void* mutable_ptr_or_null(const at::Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

}  // namespace megacore::cuda_glue

#define MEGACORE_CUDA_CHECK(op, expr)                                                             \
  do {                                                                                            \
    const cudaError_t megacore_err_ = (expr);                                                     \
    TORCH_CHECK(megacore_err_ == cudaSuccess, "megacore.", op, ": CUDA error: ",                  \
                cudaGetErrorString(megacore_err_));                                               \
  } while (0)
