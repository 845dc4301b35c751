// bias_dropout_add on CUDA. Forward: one thread per Philox counter, i.e. per 4 consecutive elements (one
// aligned pack when cols % 4 == 0). Backward with a bias: column tiles whose threads own 4 consecutive
// columns, writing grad_x and, in the same pass, per-block column partial sums for the bias gradient. The
// keep decision and the multiplier are kernels/dropout.h's, shared with the CPU kernels.
#include "kernels/cuda/common.cuh"
#include "kernels/dropout.h"
#include "kernels/philox.h"

namespace megacore::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kColsPerThread = 4;

/// Word i (0..7) of two consecutive Philox outputs u[0..3], u[4..7], without dynamic register indexing.
__device__ __forceinline__ uint32_t pick_word(const uint32_t (&u)[8], int i) {
  uint32_t w = u[0];
#pragma unroll
  for (int j = 1; j < 8; ++j) w = i == j ? u[j] : w;
  return w;
}

// out = res + m * (x + bias) with m = keep ? scale : 0 (Drop) or 1; bias and res may be null. Thread g owns
// elements [4g, 4g + 4), the 4 words of counter g. Vec4: cols % 4 == 0 and all pointers 4-element aligned.
template <typename T, bool Vec4, bool Drop>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, const T* __restrict__ res,
                               T* __restrict__ out, int64_t n, int64_t cols, uint64_t seed, uint32_t threshold,
                               acc_t<T> scale) {
  using A = acc_t<T>;
  using P = Pack<T, 4>;
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t u[4] = {0, 0, 0, 0};
    if constexpr (Drop) philox::philox4x32_10(static_cast<uint64_t>(g), seed, u);
    const int64_t e0 = 4 * g;
    if constexpr (Vec4) {
      const int64_t c0 = e0 % cols;
      const P xv = *reinterpret_cast<const P*>(x + e0);
      P bv, rv, o;
      if (bias) bv = *reinterpret_cast<const P*>(bias + c0);
      if (res) rv = *reinterpret_cast<const P*>(res + e0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        A y = to_acc(xv.v[k]);
        if (bias) y += to_acc(bv.v[k]);
        if constexpr (Drop) y *= kernels::dropout::multiplier(u[k], threshold, scale);
        if (res) y += to_acc(rv.v[k]);
        o.v[k] = from_acc<T>(y);
      }
      *reinterpret_cast<P*>(out + e0) = o;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t e = e0 + k;
        if (e >= n) break;
        A y = to_acc(x[e]);
        if (bias) y += to_acc(bias[e % cols]);
        if constexpr (Drop) y *= kernels::dropout::multiplier(u[k], threshold, scale);
        if (res) y += to_acc(res[e]);
        out[e] = from_acc<T>(y);
      }
    }
  }
}

// Block (kColTileX, kColTileY); thread x owns columns [c0, c0 + 4) of a 4 * kColTileX column tile and
// blockIdx.y strides over rows. grad_x = grad * m; the block's column sums go to partial[blockIdx.y, :].
template <typename T, bool Drop>
__global__ void backward_bias_kernel(const T* __restrict__ grad, T* __restrict__ grad_x, acc_t<T>* __restrict__ partial,
                                     int64_t rows, int64_t cols, uint64_t seed, uint32_t threshold, acc_t<T> scale) {
  using A = acc_t<T>;
  __shared__ A tile[kColTileY][kColTileX * kColsPerThread];
  const int64_t c0 = (blockIdx.x * static_cast<int64_t>(kColTileX) + threadIdx.x) * kColsPerThread;
  A acc[kColsPerThread] = {};
  if (c0 < cols) {
    for (int64_t r = blockIdx.y * static_cast<int64_t>(kColTileY) + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kColTileY) {
      const int64_t e0 = r * cols + c0;
      // Elements e0..e0+3 may straddle two counters: words off..off+3 of counters q, q + 1.
      const int off = kernels::dropout::word_of(e0);
      const uint64_t q = kernels::dropout::counter_of(e0);
      uint32_t u[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if constexpr (Drop) {
        uint32_t* lo = u;
        uint32_t* hi = u + 4;
        philox::philox4x32_10(q, seed, lo);
        if (off != 0 && c0 + (4 - off) < cols) philox::philox4x32_10(q + 1, seed, hi);
      }
#pragma unroll
      for (int k = 0; k < kColsPerThread; ++k) {
        if (c0 + k >= cols) break;
        A gx = to_acc(grad[e0 + k]);
        if constexpr (Drop) gx *= kernels::dropout::multiplier(pick_word(u, off + k), threshold, scale);
        grad_x[e0 + k] = from_acc<T>(gx);
        acc[k] += gx;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) tile[threadIdx.y][threadIdx.x * kColsPerThread + k] = acc[k];
  __syncthreads();
  if (threadIdx.y != 0) return;
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) {
    if (c0 + k >= cols) break;
    A s = 0;
#pragma unroll
    for (int y = 0; y < kColTileY; ++y) s += tile[y][threadIdx.x * kColsPerThread + k];
    partial[blockIdx.y * cols + c0 + k] = s;
  }
}

inline bool aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename T>
cudaError_t launch_forward(const T* x, const T* bias, const T* res, T* out, int64_t n, int64_t cols, double p,
                           int64_t seed, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t groups = (n + 3) / 4;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((groups + kThreads - 1) / kThreads, 65535LL * 8));
  const bool vec4 = cols % 4 == 0 && aligned(x, 4 * sizeof(T)) && aligned(bias, 4 * sizeof(T)) &&
                    aligned(res, 4 * sizeof(T)) && aligned(out, 4 * sizeof(T));
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t t = kernels::dropout::threshold(p);
  const A scale = kernels::dropout::scale<A>(p);
  if (p > 0) {
    if (vec4) forward_kernel<T, true, true><<<blocks, kThreads, 0, stream>>>(x, bias, res, out, n, cols, s, t, scale);
    else forward_kernel<T, false, true><<<blocks, kThreads, 0, stream>>>(x, bias, res, out, n, cols, s, t, scale);
  } else {
    if (vec4) forward_kernel<T, true, false><<<blocks, kThreads, 0, stream>>>(x, bias, res, out, n, cols, s, t, scale);
    else forward_kernel<T, false, false><<<blocks, kThreads, 0, stream>>>(x, bias, res, out, n, cols, s, t, scale);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t bias_dropout_add_forward(const kernels::BiasDropoutAddForward& p, cudaStream_t stream) {
  NvtxRange range("megacore.bias_dropout_add");
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return launch_forward<T>(static_cast<const T*>(p.x), static_cast<const T*>(p.bias),
                             static_cast<const T*>(p.residual), static_cast<T*>(p.out), p.rows * p.cols, p.cols, p.p,
                             p.seed, stream);
  });
  return cudaSuccess;
}

cudaError_t bias_dropout_add_backward(const kernels::BiasDropoutAddBackward& p, cudaStream_t stream) {
  NvtxRange range("megacore.bias_dropout_add_backward");
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    using A = acc_t<T>;
    const int64_t rows = p.rows, cols = p.cols;
    const T* g = static_cast<const T*>(p.grad_out);
    T* gx = static_cast<T*>(p.grad_x);
    // Without a bias, grad_x = m * grad is the forward with no bias and no residual.
    if (!p.grad_bias) return launch_forward<T>(g, nullptr, nullptr, gx, rows * cols, cols, p.p, p.seed, stream);
    const int64_t prows = column_partial_rows(rows);
    const dim3 block(kColTileX, kColTileY);
    const dim3 grid(static_cast<unsigned>((cols + kColTileX * kColsPerThread - 1) / (kColTileX * kColsPerThread)),
                    static_cast<unsigned>(prows));
    A* part = static_cast<A*>(p.workspace);
    const uint64_t s = static_cast<uint64_t>(p.seed);
    const uint32_t t = kernels::dropout::threshold(p.p);
    const A scale = kernels::dropout::scale<A>(p.p);
    if (p.p > 0) backward_bias_kernel<T, true><<<grid, block, 0, stream>>>(g, gx, part, rows, cols, s, t, scale);
    else backward_bias_kernel<T, false><<<grid, block, 0, stream>>>(g, gx, part, rows, cols, s, t, scale);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    return finish_column_sum<T>(part, prows, cols, static_cast<T*>(p.grad_bias), stream);
  });
  return cudaSuccess;
}

}  // namespace megacore::cuda
