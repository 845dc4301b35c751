#pragma once
// \brief Device-side helpers of megacore's CUDA kernels (kernels/cuda/*.cu): dtype dispatch, loads/stores in
//        the accumulation type, warp and block reductions, NVTX ranges, column reductions. No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <cstdint>
#include <type_traits>

#include "kernels/common.h"

namespace megacore::cuda {

using kernels::DType;
using kernels::kColTileX;
using kernels::kColTileY;
using kernels::column_partial_rows;

/// \brief Opens an NVTX range named after the op for the launcher's scope, so Nsight timelines read
///        like the code: "megacore.<op>", the torch op's name (megacore.layer_norm, megacore.layer_norm_backward).
///        tests/test_profiling.py checks every launcher opens one; docs/profiling.md lists them.
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T v) {
  return static_cast<acc_t<T>>(v);
}
template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

/// Runs the statement list with `T` bound to the C++ type of `dtype`; an unknown dtype returns
/// cudaErrorInvalidValue from the enclosing launcher.
#define MEGACORE_DISPATCH_FLOAT(dtype, T, ...) \
  MEGACORE_DISPATCH_DTYPE(dtype, T, __half, __nv_bfloat16, return cudaErrorInvalidValue, __VA_ARGS__)

/// \brief `N` elements loaded or stored as one aligned access (16 bytes for N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

/// \brief Widest pack (up to 16 bytes) that divides `cols` and the alignment of every pointer given.
template <typename T>
inline int pack_width(int64_t cols, std::initializer_list<const void*> ptrs) {
  int n = static_cast<int>(16 / sizeof(T));
  while (n > 1) {
    bool ok = cols % n == 0;
    for (const void* p : ptrs) ok = ok && (p == nullptr || reinterpret_cast<uintptr_t>(p) % (n * sizeof(T)) == 0);
    if (ok) break;
    n /= 2;
  }
  return n;
}

/// \brief Calls f(std::integral_constant<int, N>) for the pack width n (8, 4, 2 or 1).
template <typename F>
cudaError_t with_pack(int n, const F& f) {
  switch (n) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

/// \brief Sum over the block; every thread gets the result. `shared` holds >= 32 values; the block
///        size is a multiple of 32.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : A(0);
  return warp_sum(v);
}

/// \brief Max over the block; every thread gets the result.
template <typename A>
__device__ __forceinline__ A block_max(A v, A* shared, A lowest) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : lowest;
  return warp_max(v);
}

// ---- column reductions (bias / weight gradients) ---------------------------------------------------
// A kernel that produces per-element values of a [rows, cols] matrix and needs their column sums
// accumulates, per thread, over a strided set of rows, reduces within the block, and writes one row of
// `partial` ([column_partial_rows(rows), cols], fp32/fp64) per blockIdx.y; finish_column_sum adds the
// partial rows in a fixed order (deterministic) and writes the result in the output dtype.

template <typename T>
__global__ void finish_column_sum_kernel(const acc_t<T>* partial, int64_t prows, int64_t cols, T* out) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  acc_t<T> s = 0;
  for (int64_t r = 0; r < prows; ++r) s += partial[r * cols + c];
  out[c] = from_acc<T>(s);
}

template <typename T>
cudaError_t finish_column_sum(const acc_t<T>* partial, int64_t prows, int64_t cols, T* out, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  const int threads = 256;
  finish_column_sum_kernel<T><<<static_cast<unsigned>((cols + threads - 1) / threads), threads, 0, stream>>>(
      partial, prows, cols, out);
  return cudaGetLastError();
}

}  // namespace megacore::cuda
