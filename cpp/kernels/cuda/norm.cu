// LayerNorm / RMSNorm on CUDA. A row is handled by one warp (short rows, several rows per block) or by
// one block (long rows); its statistics are an exact two-pass mean/variance in fp32 (fp64 for fp64)
// over the row, which the second and third passes re-read from L1/L2. The weight/bias gradients are a
// separate column-tiled kernel writing per-block partial sums, added in a fixed order by
// finish_column_sum (deterministic). The per-element formulas (normalize and affine, grad_x from the row
// sums) are kernels/norm.h's, shared with the CPU kernels.
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/norm.h"

namespace megacore::cuda {
namespace {

namespace norm = kernels::norm;

constexpr int64_t kWarpMaxCols = 1024;  // rows up to this length get one warp each
constexpr int kRowsPerBlock = 4;        // warps (rows) per block in warp-per-row mode

/// Sum over the threads of a row: the warp (kWarp) or the whole block (blockDim.y == 1).
template <bool kWarp, typename A>
__device__ __forceinline__ A row_sum(A v, A* shared) {
  if constexpr (kWarp) {
    return warp_sum(v);
  } else {
    return block_sum(v, shared);
  }
}

// Block (32, kRowsPerBlock) with a row per warp, or (threads, 1) with a row per block; rows in a
// grid-stride loop (the row index is uniform over the threads that reduce together). Each thread reads
// packs of N elements (N divides cols and every pointer's alignment).
template <typename T, int N, bool kWarp>
__global__ void __launch_bounds__(1024)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
                   T* __restrict__ out, acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ rstd, int64_t rows,
                   int64_t cols, acc_t<T> eps) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  __shared__ A red[32];
  const int64_t packs = cols / N;
  const P* w = reinterpret_cast<const P*>(weight);
  const P* b = reinterpret_cast<const P*>(bias);
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const P* xr = reinterpret_cast<const P*>(x + row * cols);
    P* outr = reinterpret_cast<P*>(out + row * cols);
    A mu = 0;
    if (mean) {
      A s = 0;
      for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
        const P v = xr[i];
#pragma unroll
        for (int k = 0; k < N; ++k) s += to_acc(v.v[k]);
      }
      mu = row_sum<kWarp>(s, red) / static_cast<A>(cols);
    }
    A s2 = 0;  // second pass: squared deviations from the mean (RMSNorm: from 0)
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const P v = xr[i];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A d = to_acc(v.v[k]) - mu;
        s2 += d * d;
      }
    }
    const A rs = A(1) / sqrt(row_sum<kWarp>(s2, red) / static_cast<A>(cols) + eps);
    if (threadIdx.x == 0) {
      if (mean) mean[row] = mu;
      rstd[row] = rs;
    }
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const P v = xr[i];
      P wv, bv, o;
      if (w) wv = w[i];
      if (b) bv = b[i];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        o.v[k] = from_acc<T>(norm::forward(to_acc(v.v[k]), mu, rs, w != nullptr, w ? to_acc(wv.v[k]) : A(0),
                                           b != nullptr, b ? to_acc(bv.v[k]) : A(0)));
      }
      outr[i] = o;
    }
  }
}

// grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = grad * weight, xhat = (x - mean) * rstd
// (RMSNorm: no mean(g) term). Same row layout as forward_kernel.
template <typename T, int N, bool kWarp>
__global__ void __launch_bounds__(1024)
    backward_x_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ weight,
                      const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd, T* __restrict__ grad_x,
                      int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  __shared__ A red[32];
  const int64_t packs = cols / N;
  const P* w = reinterpret_cast<const P*>(weight);
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const P* gr = reinterpret_cast<const P*>(grad + row * cols);
    const P* xr = reinterpret_cast<const P*>(x + row * cols);
    P* gxr = reinterpret_cast<P*>(grad_x + row * cols);
    const A mu = mean ? mean[row] : A(0), rs = rstd[row];
    A sg = 0, sgx = 0;
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const P dv = gr[i], xv = xr[i];
      P wv;
      if (w) wv = w[i];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A g = norm::grad_xhat(to_acc(dv.v[k]), w != nullptr, w ? to_acc(wv.v[k]) : A(0));
        sg += g;
        sgx += g * norm::normalize(to_acc(xv.v[k]), mu, rs);
      }
    }
    const A a = mean ? row_sum<kWarp>(sg, red) / static_cast<A>(cols) : A(0);
    const A c = row_sum<kWarp>(sgx, red) / static_cast<A>(cols);
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const P dv = gr[i], xv = xr[i];
      P wv, o;
      if (w) wv = w[i];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A g = norm::grad_xhat(to_acc(dv.v[k]), w != nullptr, w ? to_acc(wv.v[k]) : A(0));
        o.v[k] = from_acc<T>(norm::grad_x(g, norm::normalize(to_acc(xv.v[k]), mu, rs), rs, a, c));
      }
      gxr[i] = o;
    }
  }
}

// Column sums of grad * xhat (part_w) and grad (part_b), either may be null. Block (kColTileX,
// kColTileY) covers kColTileX columns; blockIdx.y strides over rows and writes row blockIdx.y of the
// partial sums.
template <typename T>
__global__ void param_grad_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                  const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                                  acc_t<T>* __restrict__ part_w, acc_t<T>* __restrict__ part_b, int64_t rows,
                                  int64_t cols) {
  using A = acc_t<T>;
  __shared__ A tile_w[kColTileY][kColTileX + 1];
  __shared__ A tile_b[kColTileY][kColTileX + 1];
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColTileX) + threadIdx.x;
  A aw = 0, ab = 0;
  if (c < cols) {
    for (int64_t r = blockIdx.y * static_cast<int64_t>(kColTileY) + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kColTileY) {
      const int64_t e = r * cols + c;
      const A dy = to_acc(grad[e]);
      if (part_w) aw += dy * norm::normalize(to_acc(x[e]), mean ? mean[r] : A(0), rstd[r]);
      ab += dy;
    }
  }
  tile_w[threadIdx.y][threadIdx.x] = aw;
  tile_b[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    A sw = 0, sb = 0;
#pragma unroll
    for (int k = 0; k < kColTileY; ++k) {
      sw += tile_w[k][threadIdx.x];
      sb += tile_b[k][threadIdx.x];
    }
    if (part_w) part_w[blockIdx.y * cols + c] = sw;
    if (part_b) part_b[blockIdx.y * cols + c] = sb;
  }
}

/// Launch shape of the row kernels: a warp per row for short rows, else a block per row with about
/// four packs per thread (a multiple of 32, at most 1024). Calls f(std::bool_constant<warp>, grid, block).
template <typename F>
cudaError_t with_row_layout(int64_t rows, int64_t cols, int n, const F& f) {
  constexpr int64_t kMaxGrid = 65535LL * 256;  // rows beyond this are covered by the grid-stride loop
  if (cols <= kWarpMaxCols) {
    const int64_t blocks = std::min<int64_t>((rows + kRowsPerBlock - 1) / kRowsPerBlock, kMaxGrid);
    return f(std::true_type{}, dim3(static_cast<unsigned>(blocks)), dim3(32, kRowsPerBlock));
  }
  const int64_t wanted = (cols / n + 3) / 4;  // threads for ~4 packs each
  const int64_t threads = std::min<int64_t>(1024, std::max<int64_t>(128, (wanted + 31) / 32 * 32));
  return f(std::false_type{}, dim3(static_cast<unsigned>(std::min<int64_t>(rows, kMaxGrid))),
           dim3(static_cast<unsigned>(threads)));
}

}  // namespace

cudaError_t norm_forward(const kernels::NormForward& p, cudaStream_t stream) {
  NvtxRange range(p.mean ? "megacore.layer_norm" : "megacore.rms_norm");
  if (p.rows == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    using A = acc_t<T>;
    const int n = pack_width<T>(p.cols, {p.x, p.weight, p.bias, p.out});
    return with_pack(n, [&](auto np) {
      constexpr int N = decltype(np)::value;
      return with_row_layout(p.rows, p.cols, N, [&](auto warp, dim3 grid, dim3 block) {
        forward_kernel<T, N, decltype(warp)::value><<<grid, block, 0, stream>>>(
            static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<const T*>(p.bias),
            static_cast<T*>(p.out), static_cast<A*>(p.mean), static_cast<A*>(p.rstd), p.rows, p.cols,
            static_cast<A>(p.eps));
        return cudaGetLastError();
      });
    });
  });
  return cudaSuccess;
}

cudaError_t norm_backward(const kernels::NormBackward& p, cudaStream_t stream) {
  NvtxRange range(p.mean ? "megacore.layer_norm_backward" : "megacore.rms_norm_backward");
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    using A = acc_t<T>;
    const int64_t rows = p.rows, cols = p.cols;
    const A* mp = static_cast<const A*>(p.mean);
    const A* rp = static_cast<const A*>(p.rstd);
    const int n = pack_width<T>(cols, {p.grad_out, p.x, p.weight, p.grad_x});
    cudaError_t err = with_pack(n, [&](auto np) {
      constexpr int N = decltype(np)::value;
      return with_row_layout(rows, cols, N, [&](auto warp, dim3 grid, dim3 block) {
        backward_x_kernel<T, N, decltype(warp)::value><<<grid, block, 0, stream>>>(
            static_cast<const T*>(p.grad_out), static_cast<const T*>(p.x), static_cast<const T*>(p.weight), mp, rp,
            static_cast<T*>(p.grad_x), rows, cols);
        return cudaGetLastError();
      });
    });
    if (err != cudaSuccess || (!p.grad_weight && !p.grad_bias)) return err;

    const int64_t prows = column_partial_rows(rows);
    A* part_w = p.grad_weight ? static_cast<A*>(p.workspace) : nullptr;
    A* part_b = p.grad_bias ? static_cast<A*>(p.workspace) + prows * cols : nullptr;
    const dim3 grid(static_cast<unsigned>((cols + kColTileX - 1) / kColTileX), static_cast<unsigned>(prows));
    param_grad_kernel<T><<<grid, dim3(kColTileX, kColTileY), 0, stream>>>(static_cast<const T*>(p.grad_out),
                                                                        static_cast<const T*>(p.x), mp, rp, part_w,
                                                                        part_b, rows, cols);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if (part_w) err = finish_column_sum<T>(part_w, prows, cols, static_cast<T*>(p.grad_weight), stream);
    if (err != cudaSuccess) return err;
    if (part_b) return finish_column_sum<T>(part_b, prows, cols, static_cast<T*>(p.grad_bias), stream);
    return cudaSuccess;
  });
  return cudaSuccess;
}

}  // namespace megacore::cuda
