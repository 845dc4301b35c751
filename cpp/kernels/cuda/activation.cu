// The activation kernels on CUDA: vectorized elementwise forwards; backwards that write grad_x and, in the
// same pass, per-block column partial sums for the bias gradient. The activations themselves are
// kernels/activation.h's, shared with the CPU kernels.
#include "kernels/activation.h"
#include "kernels/cuda/common.cuh"

namespace megacore::cuda {
namespace {

using kernels::Activation;
namespace act = kernels::activation;

#define MEGACORE_CUDA_DISPATCH_ACTIVATION(activation, A, ...) \
  MEGACORE_DISPATCH_ACTIVATION(activation, A, return cudaErrorInvalidValue, __VA_ARGS__)

// ---- bias + activation ---------------------------------------------------------------------------------

// Each thread handles N consecutive elements of a row (N divides cols, so a pack never straddles rows).
template <Activation Act, typename T, int N>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                               int64_t packs, int64_t cols) {
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
      o.v[k] = from_acc<T>(act::forward<Act>(v));
    }
    *reinterpret_cast<P*>(out + e) = o;
  }
}

// Block (kColTileX, kColTileY) covers kColTileX columns; blockIdx.y strides over rows. With `partial`,
// the block's column sums of grad_x go to partial[blockIdx.y, :].
template <Activation Act, typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ bias,
                                T* __restrict__ grad_x, acc_t<T>* __restrict__ partial, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  __shared__ A tile[kColTileY][kColTileX + 1];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColTileX) + threadIdx.x;
  A acc = 0;
  if (c < cols) {
    const A b = bias ? to_acc(bias[c]) : A(0);
    for (int64_t r = blockIdx.y * static_cast<int64_t>(kColTileY) + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kColTileY) {
      const int64_t e = r * cols + c;
      const A gx = to_acc(grad[e]) * act::grad<Act>(to_acc(x[e]) + b);
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

template <Activation Act, typename T, int N>
cudaError_t launch_forward(const T* x, const T* bias, T* out, int64_t n, int64_t cols, cudaStream_t stream) {
  const int threads = 256;
  const int64_t packs = n / N;
  const int64_t blocks = std::min<int64_t>((packs + threads - 1) / threads, 65535LL * 8);
  forward_kernel<Act, T, N><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, bias, out, packs, cols);
  return cudaGetLastError();
}

// ---- gated linear units: x [rows, 2 cols] = [gate | linear] -> out [rows, cols] ------------------------

// Each thread handles N consecutive outputs of a row, reading N gate and N linear elements (N divides
// cols, so neither pack straddles a half or a row).
template <Activation Act, typename T, int N>
__global__ void gated_forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ out,
                                     int64_t packs, int64_t cols) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * N, row = e / cols, c = e % cols;
    const T* gate = x + row * 2 * cols + c;
    const P av = *reinterpret_cast<const P*>(gate);
    const P bv = *reinterpret_cast<const P*>(gate + cols);
    P abias, bbias;
    if (bias) {
      abias = *reinterpret_cast<const P*>(bias + c);
      bbias = *reinterpret_cast<const P*>(bias + cols + c);
    }
    P o;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      A a = to_acc(av.v[k]), b = to_acc(bv.v[k]);
      if (bias) {
        a += to_acc(abias.v[k]);
        b += to_acc(bbias.v[k]);
      }
      o.v[k] = from_acc<T>(act::forward<Act>(a) * b);
    }
    *reinterpret_cast<P*>(out + e) = o;
  }
}

// As backward_kernel, over the output's columns: each thread writes the gate's and the linear half's
// gradients at its column, and with `partial` ([gridDim.y, 2 cols]) the block's column sums of both.
template <Activation Act, typename T>
__global__ void gated_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                      const T* __restrict__ bias, T* __restrict__ grad_x,
                                      acc_t<T>* __restrict__ partial, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  __shared__ A tile_gate[kColTileY][kColTileX + 1];
  __shared__ A tile_linear[kColTileY][kColTileX + 1];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColTileX) + threadIdx.x;
  A acc_gate = 0, acc_linear = 0;
  if (c < cols) {
    const A bias_gate = bias ? to_acc(bias[c]) : A(0);
    const A bias_linear = bias ? to_acc(bias[cols + c]) : A(0);
    for (int64_t r = blockIdx.y * static_cast<int64_t>(kColTileY) + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kColTileY) {
      const int64_t e = r * 2 * cols + c;
      const A g = to_acc(grad[r * cols + c]);
      const A b = to_acc(x[e + cols]) + bias_linear;
      const auto f = act::value_and_grad<Act>(to_acc(x[e]) + bias_gate);
      const A ga = g * b * f.grad, gb = g * f.value;
      grad_x[e] = from_acc<T>(ga);
      grad_x[e + cols] = from_acc<T>(gb);
      acc_gate += ga;
      acc_linear += gb;
    }
  }
  if (!partial) return;
  tile_gate[threadIdx.y][threadIdx.x] = acc_gate;
  tile_linear[threadIdx.y][threadIdx.x] = acc_linear;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    A sa = 0, sb = 0;
#pragma unroll
    for (int k = 0; k < kColTileY; ++k) {
      sa += tile_gate[k][threadIdx.x];
      sb += tile_linear[k][threadIdx.x];
    }
    partial[blockIdx.y * 2 * cols + c] = sa;
    partial[blockIdx.y * 2 * cols + cols + c] = sb;
  }
}

template <Activation Act, typename T, int N>
cudaError_t launch_gated_forward(const T* x, const T* bias, T* out, int64_t n, int64_t cols, cudaStream_t stream) {
  const int threads = 256;
  const int64_t packs = n / N;
  const int64_t blocks = std::min<int64_t>((packs + threads - 1) / threads, 65535LL * 8);
  gated_forward_kernel<Act, T, N><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(x, bias, out, packs, cols);
  return cudaGetLastError();
}

}  // namespace

cudaError_t bias_activation_forward(const kernels::BiasActivationForward& p, cudaStream_t stream) {
  NvtxRange range(p.activation == Activation::kRelu ? "megacore.bias_relu" : "megacore.bias_gelu");
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, MEGACORE_CUDA_DISPATCH_ACTIVATION(p.activation, Act, {
    const T* xp = static_cast<const T*>(p.x);
    const T* bp = static_cast<const T*>(p.bias);
    T* op = static_cast<T*>(p.out);
    const int64_t n = p.rows * p.cols;
    return with_pack(pack_width<T>(p.cols, {p.x, p.bias, p.out}), [&](auto np) {
      return launch_forward<Act, T, decltype(np)::value>(xp, bp, op, n, p.cols, stream);
    });
  }));
  return cudaSuccess;
}

cudaError_t bias_activation_backward(const kernels::BiasActivationBackward& p, cudaStream_t stream) {
  NvtxRange range(p.activation == Activation::kRelu ? "megacore.bias_relu_backward" : "megacore.bias_gelu_backward");
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, MEGACORE_CUDA_DISPATCH_ACTIVATION(p.activation, Act, {
    using A = acc_t<T>;
    const int64_t prows = column_partial_rows(p.rows);
    const dim3 block(kColTileX, kColTileY);
    const dim3 grid(static_cast<unsigned>((p.cols + kColTileX - 1) / kColTileX), static_cast<unsigned>(prows));
    A* part = p.grad_bias ? static_cast<A*>(p.workspace) : nullptr;
    backward_kernel<Act, T><<<grid, block, 0, stream>>>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.x),
                                                        static_cast<const T*>(p.bias), static_cast<T*>(p.grad_x), part,
                                                        p.rows, p.cols);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || !p.grad_bias) return err;
    return finish_column_sum<T>(part, prows, p.cols, static_cast<T*>(p.grad_bias), stream);
  }));
  return cudaSuccess;
}

cudaError_t bias_gated_forward(const kernels::BiasGatedForward& p, cudaStream_t stream) {
  NvtxRange range("megacore.bias_gated");
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, MEGACORE_CUDA_DISPATCH_ACTIVATION(p.activation, Act, {
    const T* xp = static_cast<const T*>(p.x);
    const T* bp = static_cast<const T*>(p.bias);
    T* op = static_cast<T*>(p.out);
    const int64_t n = p.rows * p.cols;
    // cols | N keeps the linear half (x + cols, bias + cols) and every row as aligned as x.
    return with_pack(pack_width<T>(p.cols, {p.x, p.bias, p.out}), [&](auto np) {
      return launch_gated_forward<Act, T, decltype(np)::value>(xp, bp, op, n, p.cols, stream);
    });
  }));
  return cudaSuccess;
}

cudaError_t bias_gated_backward(const kernels::BiasGatedBackward& p, cudaStream_t stream) {
  NvtxRange range("megacore.bias_gated_backward");
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, MEGACORE_CUDA_DISPATCH_ACTIVATION(p.activation, Act, {
    using A = acc_t<T>;
    const int64_t prows = column_partial_rows(p.rows);
    const dim3 block(kColTileX, kColTileY);
    const dim3 grid(static_cast<unsigned>((p.cols + kColTileX - 1) / kColTileX), static_cast<unsigned>(prows));
    A* part = p.grad_bias ? static_cast<A*>(p.workspace) : nullptr;
    gated_backward_kernel<Act, T><<<grid, block, 0, stream>>>(
        static_cast<const T*>(p.grad_out), static_cast<const T*>(p.x), static_cast<const T*>(p.bias),
        static_cast<T*>(p.grad_x), part, p.rows, p.cols);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || !p.grad_bias) return err;
    return finish_column_sum<T>(part, prows, 2 * p.cols, static_cast<T*>(p.grad_bias), stream);
  }));
  return cudaSuccess;
}

}  // namespace megacore::cuda
