// bias_gelu on CUDA: a vectorized elementwise forward; a backward that writes grad_x and, in the same
// pass, per-block column partial sums for the bias gradient. The GeLU itself is kernels/activation.h's,
// shared with the CPU kernels.
#include "kernels/cuda/common.cuh"
#include "kernels/activation.h"

namespace megacore::cuda {
namespace {

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
      o.v[k] = from_acc<T>(kernels::gelu::forward(v, tanh_approx));
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
      const A gx = to_acc(grad[e]) * kernels::gelu::grad(to_acc(x[e]) + b, tanh_approx);
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

cudaError_t bias_gelu_forward(const kernels::BiasGeluForward& p, cudaStream_t stream) {
  NvtxRange range("megacore.bias_gelu");
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    const T* xp = static_cast<const T*>(p.x);
    const T* bp = static_cast<const T*>(p.bias);
    T* op = static_cast<T*>(p.out);
    const int64_t n = p.rows * p.cols;
    switch (pack_width<T>(p.cols, {p.x, p.bias, p.out})) {
      case 8: return launch_forward<T, 8>(xp, bp, op, n, p.cols, p.tanh, stream);
      case 4: return launch_forward<T, 4>(xp, bp, op, n, p.cols, p.tanh, stream);
      case 2: return launch_forward<T, 2>(xp, bp, op, n, p.cols, p.tanh, stream);
      default: return launch_forward<T, 1>(xp, bp, op, n, p.cols, p.tanh, stream);
    }
  });
  return cudaSuccess;
}

cudaError_t bias_gelu_backward(const kernels::BiasGeluBackward& p, cudaStream_t stream) {
  NvtxRange range("megacore.bias_gelu_backward");
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    using A = acc_t<T>;
    const int64_t prows = column_partial_rows(p.rows);
    const dim3 block(kColTileX, kColTileY);
    const dim3 grid(static_cast<unsigned>((p.cols + kColTileX - 1) / kColTileX), static_cast<unsigned>(prows));
    A* part = p.grad_bias ? static_cast<A*>(p.workspace) : nullptr;
    backward_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.x),
                                                   static_cast<const T*>(p.bias), static_cast<T*>(p.grad_x), part,
                                                   p.rows, p.cols, p.tanh);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || !p.grad_bias) return err;
    return finish_column_sum<T>(part, prows, p.cols, static_cast<T*>(p.grad_bias), stream);
  });
  return cudaSuccess;
}

}  // namespace megacore::cuda
