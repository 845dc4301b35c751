// bias_gelu on CUDA: a vectorized elementwise forward; a backward that writes grad_x and, in the same
// pass, per-block column partial sums for the bias gradient.
#include "common.cuh"
#include "gelu.h"

namespace megacore::cuda {
namespace {

template <typename A>
__device__ __forceinline__ A gelu(A x, bool tanh_approx) {
  if (tanh_approx) {
    const A inner = A(0.7978845608028654) * (x + A(0.044715) * x * x * x);
    return A(0.5) * x * (A(1) + tanh(inner));
  }
  return A(0.5) * x * (A(1) + erf(x * A(0.7071067811865476)));
}

template <typename A>
__device__ __forceinline__ A gelu_grad(A x, bool tanh_approx) {
  if (tanh_approx) {
    const A k0 = A(0.7978845608028654), k1 = A(0.044715), x2 = x * x;
    const A t = tanh(k0 * (x + k1 * x2 * x));
    return A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * k0 * (A(1) + A(3) * k1 * x2);
  }
  return A(0.5) * (A(1) + erf(x * A(0.7071067811865476))) + x * exp(A(-0.5) * x * x) * A(0.3989422804014327);
}

// Each thread handles N consecutive elements of a row (N divides cols, so a pack never straddles rows).
template <typename T, int N>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                               int64_t packs, int64_t cols, bool tanh_approx) {
  using P = Pack<T, N>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * N, c = e % cols;
    const P xv = *reinterpret_cast<const P*>(x + e);
    P bv;
    if (bias) bv = *reinterpret_cast<const P*>(bias + c);
    P o;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      acc_t<T> v = to_acc(xv.v[k]);
      if (bias) v += to_acc(bv.v[k]);
      o.v[k] = from_acc<T>(gelu(v, tanh_approx));
    }
    *reinterpret_cast<P*>(out + e) = o;
  }
}

// Block (kColTileX, kColTileY) covers kColTileX columns; blockIdx.y strides over rows. With `partial`,
// the block's column sums of grad_x go to partial[blockIdx.y, :].
template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ bias,
                                T* __restrict__ grad_x, acc_t<T>* __restrict__ partial, int64_t rows, int64_t cols,
                                bool tanh_approx) {
  using A = acc_t<T>;
  __shared__ A tile[kColTileY][kColTileX + 1];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColTileX) + threadIdx.x;
  A acc = 0;
  if (c < cols) {
    const A b = bias ? to_acc(bias[c]) : A(0);
    for (int64_t r = blockIdx.y * static_cast<int64_t>(kColTileY) + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kColTileY) {
      const int64_t e = r * cols + c;
      const A gx = to_acc(grad[e]) * gelu_grad(to_acc(x[e]) + b, tanh_approx);
      grad_x[e] = from_acc<T>(gx);
      acc += gx;
    }
  }
  if (!partial) return;
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    A s = 0;
#pragma unroll
    for (int k = 0; k < kColTileY; ++k) s += tile[k][threadIdx.x];
    partial[blockIdx.y * cols + c] = s;
  }
}

template <typename T, int N>
cudaError_t launch_forward(const T* x, const T* bias, T* out, int64_t n, int64_t cols, bool tanh_approx,
                           cudaStream_t stream) {
  const int threads = 256;
  const int64_t packs = n / N;
  const int64_t blocks = std::min<int64_t>((packs + threads - 1) / threads, 65535LL * 8);
  forward_kernel<T, N><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, bias, out, packs, cols, tanh_approx);
  return cudaGetLastError();
}

}  // namespace

cudaError_t bias_gelu_forward(const void* x, const void* bias, void* out, int64_t rows, int64_t cols, DType dtype,
                              bool tanh, cudaStream_t stream) {
  NvtxRange range("megacore.bias_gelu");
  if (rows == 0 || cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(dtype, T, {
    const T* xp = static_cast<const T*>(x);
    const T* bp = static_cast<const T*>(bias);
    T* op = static_cast<T*>(out);
    const int64_t n = rows * cols;
    switch (pack_width<T>(cols, {x, bias, out})) {
      case 8: return launch_forward<T, 8>(xp, bp, op, n, cols, tanh, stream);
      case 4: return launch_forward<T, 4>(xp, bp, op, n, cols, tanh, stream);
      case 2: return launch_forward<T, 2>(xp, bp, op, n, cols, tanh, stream);
      default: return launch_forward<T, 1>(xp, bp, op, n, cols, tanh, stream);
    }
  });
  return cudaSuccess;
}

cudaError_t bias_gelu_backward(const void* grad_out, const void* x, const void* bias, void* grad_x, void* grad_bias,
                               void* partial, int64_t rows, int64_t cols, DType dtype, bool tanh,
                               cudaStream_t stream) {
  NvtxRange range("megacore.bias_gelu_backward");
  if (rows == 0 || cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(dtype, T, {
    using A = acc_t<T>;
    const int64_t prows = column_partial_rows(rows);
    const dim3 block(kColTileX, kColTileY);
    const dim3 grid(static_cast<unsigned>((cols + kColTileX - 1) / kColTileX), static_cast<unsigned>(prows));
    A* part = grad_bias ? static_cast<A*>(partial) : nullptr;
    backward_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(grad_out), static_cast<const T*>(x),
                                                   static_cast<const T*>(bias), static_cast<T*>(grad_x), part, rows,
                                                   cols, tanh);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || !grad_bias) return err;
    return finish_column_sum<T>(part, prows, cols, static_cast<T*>(grad_bias), stream);
  });
  return cudaSuccess;
}

}  // namespace megacore::cuda
