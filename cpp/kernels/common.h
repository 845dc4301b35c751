#pragma once
// \brief What every kernel interface (cpp/kernels/<family>.h) is made of. Torch-free and free of device
//        code: g++ (the ops, the per-ISA CPU kernels) and nvcc (the CUDA kernels) both include it.
//
// A family's interface is one parameter struct per kernel, holding plain pointers, sizes and a DType,
// declared once for both devices with MEGACORE_KERNEL(name, Params):
//   CPU:  void megacore::cpu::<ISA>::name(const Params&), chosen at run time by megacore::cpu::name_kernel();
//   CUDA: cudaError_t megacore::cuda::name(const Params&, cudaStream_t), enqueued on that stream.
// The element-wise math of a family is written once in its header, as templates over V (a scalar float or
// double on either device, or an at::vec::Vectorized in the CPU kernels) that reach transcendental
// functions through Math<V>, so the CPU and CUDA kernels compute the same formulas.
#include <cmath>
#include <cstdint>

#include "common/isa.h"  // MEGACORE_CPU_KERNEL (plain C++)

#if defined(__CUDACC__)
#define MEGACORE_HD __host__ __device__ __forceinline__
#else
#define MEGACORE_HD inline
#endif

#if defined(__CUDACC__) || defined(MEGACORE_WITH_CUDA)
#include <cuda_runtime_api.h>
#define MEGACORE_KERNELS_CUDA 1
#endif

namespace megacore::kernels {

/// \brief The element types a kernel accepts; cpp/ops/op.h maps torch dtypes onto it. Computation is in
///        fp32 for fp32/fp16/bf16 and in fp64 for fp64.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

/// Runs the statement list with `T` bound to the C++ type of `dtype`: float, double, and the 16-bit types
/// the caller names (c10::Half / c10::BFloat16 in the CPU kernels, __half / __nv_bfloat16 in the CUDA
/// ones); `otherwise` runs for a value outside the enum. The one DType -> type table: the CPU and CUDA
/// dispatch macros (MEGACORE_CPU_DISPATCH, MEGACORE_DISPATCH_FLOAT) are this with their types filled in.
#define MEGACORE_DISPATCH_DTYPE(dtype, T, HalfType, BFloat16Type, otherwise, ...) \
  switch (dtype) {                                                               \
    case ::megacore::kernels::DType::kFloat32: {                                 \
      using T = float;                                                           \
      __VA_ARGS__;                                                               \
      break;                                                                     \
    }                                                                            \
    case ::megacore::kernels::DType::kFloat64: {                                 \
      using T = double;                                                          \
      __VA_ARGS__;                                                               \
      break;                                                                     \
    }                                                                            \
    case ::megacore::kernels::DType::kFloat16: {                                 \
      using T = HalfType;                                                        \
      __VA_ARGS__;                                                               \
      break;                                                                     \
    }                                                                            \
    case ::megacore::kernels::DType::kBFloat16: {                                \
      using T = BFloat16Type;                                                    \
      __VA_ARGS__;                                                               \
      break;                                                                     \
    }                                                                            \
    default:                                                                     \
      otherwise;                                                                 \
  }

/// \brief What the shared math needs beyond + - * /: transcendental functions, and ReLU's selections.
///        Scalars here (host and device); the CPU kernels add Vectorized<float/double> in
///        kernels/cpu/vec.h. `fast_exp` may be off by up to 20 ULP (ATen's exp_u20 on CPU; nvcc's
///        --use_fast_math __expf on GPU). relu(NaN) is NaN and relu_grad(NaN) is 1, as torch's relu and its
///        backward (which passes the gradient unless the output is <= 0).
template <typename V>
struct Math;

template <>
struct Math<float> {
  using Scalar = float;
  static MEGACORE_HD float exp(float x) { return ::expf(x); }
  static MEGACORE_HD float fast_exp(float x) { return ::expf(x); }
  static MEGACORE_HD float erf(float x) { return ::erff(x); }
  static MEGACORE_HD float log(float x) { return ::logf(x); }
  static MEGACORE_HD float relu(float x) { return x < 0.f ? 0.f : x; }
  static MEGACORE_HD float relu_grad(float x) { return x <= 0.f ? 0.f : 1.f; }
};

template <>
struct Math<double> {
  using Scalar = double;
  static MEGACORE_HD double exp(double x) { return ::exp(x); }
  static MEGACORE_HD double fast_exp(double x) { return ::exp(x); }
  static MEGACORE_HD double erf(double x) { return ::erf(x); }
  static MEGACORE_HD double log(double x) { return ::log(x); }
  static MEGACORE_HD double relu(double x) { return x < 0.0 ? 0.0 : x; }
  static MEGACORE_HD double relu_grad(double x) { return x <= 0.0 ? 0.0 : 1.0; }
};

/// \brief V filled with the constant c, rounded once to V's scalar type.
template <typename V>
MEGACORE_HD V splat(double c) {
  return V(static_cast<typename Math<V>::Scalar>(c));
}

// ---- column reductions of the CUDA kernels (bias / weight gradients) --------------------------------
// A CUDA kernel that sums a [rows, cols] matrix over rows writes one row of fp32 (fp64) partial sums per
// block row into a workspace of [column_partial_rows(rows), cols] per sum, then adds those rows in a fixed
// order (kernels/cuda/common.cuh). The CPU kernels need no workspace: they keep their partials themselves.
constexpr int kColTileX = 32;  // columns per block
constexpr int kColTileY = 8;   // row lanes per block
constexpr int kMaxPartialRows = 256;

/// \brief Rows of the partial-sum workspace a CUDA column reduction over `rows` rows needs.
inline int64_t column_partial_rows(int64_t rows) {
  const int64_t lanes = (rows + kColTileY * 16 - 1) / (kColTileY * 16);  // ~16 rows per thread
  return lanes < 1 ? 1 : (lanes > kMaxPartialRows ? kMaxPartialRows : lanes);
}

}  // namespace megacore::kernels

/// MEGACORE_KERNEL(name, Params) declares kernel `name` of a family for both devices (see above). The
/// CUDA launcher is declared in CUDA builds only; nvcc sees only the launcher.
#define MEGACORE_KERNEL_CUDA_DECL(name, Params) \
  namespace megacore::cuda {                    \
  cudaError_t name(const ::megacore::kernels::Params& p, cudaStream_t stream); \
  }
#if defined(__CUDACC__)
#define MEGACORE_KERNEL(name, Params) MEGACORE_KERNEL_CUDA_DECL(name, Params)
#elif defined(MEGACORE_KERNELS_CUDA)
#define MEGACORE_KERNEL(name, Params)                                   \
  MEGACORE_CPU_KERNEL(name, void(const ::megacore::kernels::Params& p)) \
  MEGACORE_KERNEL_CUDA_DECL(name, Params)
#else
#define MEGACORE_KERNEL(name, Params) MEGACORE_CPU_KERNEL(name, void(const ::megacore::kernels::Params& p))
#endif
