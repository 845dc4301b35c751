// Scaled softmax on CUDA: for rows of up to 1024 keys a warp per row with the row held in registers
// (one read, one write); longer rows get a block each, with an online max/sum sweep and a write sweep.
// Padding masks are read in place through a row layout (broadcast dims have stride 0); causal rows
// compute their visible key range [lo, hi) and only exponentiate inside it. Which keys a row sees, the
// excluded/empty-row rule and the per-element formulas are kernels/softmax.h's, shared with the CPU kernels.
#include <algorithm>
#include <cmath>

#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/softmax.h"

namespace megacore::cuda {
namespace {

constexpr int kWarpRowsPerBlock = 4;     // rows (warps) per block of the warp kernels
constexpr int64_t kMaxWarpCols = 1024;   // longest row held in a warp's registers (32 values per lane)
constexpr int64_t kMaxBlocks = 1 << 20;  // grid cap; the kernels stride over the remaining rows

using kernels::MaskRows;
using namespace kernels::softmax;

/// \brief The keys one row sees: [lo, hi) minus those whose mask byte is set.
struct RowView {
  int64_t lo, hi;
  const bool* mask;  // this row's mask, or null
  int64_t mask_stride;

  __device__ __forceinline__ bool visible(int64_t c) const {
    return c >= lo && c < hi && !key_excluded(mask, mask_stride, c);
  }
};

/// \brief How rows are masked: by a bool tensor (mask.data not null), causally, or not at all.
struct RowRule {
  MaskRows mask;
  int64_t sq, window;
  bool causal;

  __device__ __forceinline__ RowView view(int64_t row, int64_t sk) const {
    RowView v{0, sk, nullptr, 0};
    if (causal) {
      const KeyRange keys = causal_keys(row, sq, sk, window);  // never empty since sq <= sk
      v.lo = keys.lo;
      v.hi = keys.hi;
    } else if (mask.data != nullptr) {
      v.mask = mask.data + mask_row_offset(mask, row);
      v.mask_stride = mask.col_stride;
    }
    return v;
  }
};

// ---- forward --------------------------------------------------------------------------------------

// One warp per row. Lane l holds packs l, l + 32, ... of N elements: ITEMS values, ITEMS * 32 >= sk.
// N divides sk, so a pack that starts inside the row ends inside it.
template <typename T, int ITEMS, int N>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32)
    forward_warp_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t sk, acc_t<T> scale,
                        RowRule rule) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  constexpr int kPacks = ITEMS / N;
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * int64_t(kWarpRowsPerBlock) + threadIdx.x / 32; row < rows;
       row += int64_t(gridDim.x) * kWarpRowsPerBlock) {
    const RowView v = rule.view(row, sk);
    const T* xr = x + row * sk;
    A vals[ITEMS];
    A mx = excluded_score<A>();
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t c0 = (int64_t(k) * 32 + lane) * N;
      P p{};
      if (c0 < sk) p = *reinterpret_cast<const P*>(xr + c0);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        vals[k * N + j] = c0 < sk && v.visible(c0 + j) ? scaled_score(to_acc(p.v[j]), scale) : excluded_score<A>();
        mx = max(mx, vals[k * N + j]);
      }
    }
    mx = warp_max(mx);
    const bool empty = row_is_empty(mx);  // no visible key: the row is zeros
    A sum = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      vals[i] = empty ? A(0) : exp_shifted(vals[i], mx);  // 0 for hidden keys
      sum += vals[i];
    }
    sum = warp_sum(sum);
    const A inv = inv_sum(sum, empty);
    T* outr = out + row * sk;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t c0 = (int64_t(k) * 32 + lane) * N;
      if (c0 >= sk) continue;
      P o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = from_acc<T>(normalized(vals[k * N + j], inv));
      *reinterpret_cast<P*>(outr + c0) = o;
    }
  }
}

// One block per row. Sweep 1 keeps a per-thread running max and sum of exp (rescaled when the max
// grows) over the packs overlapping the visible range; sweep 2 writes the whole row.
template <typename T, int N>
__global__ void forward_block_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t sk,
                                     acc_t<T> scale, RowRule rule) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  __shared__ A shared[32];
  const int64_t step = int64_t(blockDim.x) * N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const RowView v = rule.view(row, sk);
    const T* xr = x + row * sk;
    A m = excluded_score<A>(), s = 0;
    for (int64_t c0 = (v.lo / N) * N + int64_t(threadIdx.x) * N; c0 < v.hi; c0 += step) {
      const P p = *reinterpret_cast<const P*>(xr + c0);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (!v.visible(c0 + j)) continue;
        const A val = scaled_score(to_acc(p.v[j]), scale);
        if (val == excluded_score<A>()) continue;  // adds exp(-inf) = 0; skipping avoids -inf - -inf
        if (val > m) {
          s = s * exp_shifted(m, val) + A(1);
          m = val;
        } else {
          s += exp_shifted(val, m);
        }
      }
    }
    const A mx = block_max(m, shared, excluded_score<A>());
    const bool empty = row_is_empty(mx);
    const A sum = block_sum(m == excluded_score<A>() ? A(0) : s * exp_shifted(m, mx), shared);
    const A inv = inv_sum(sum, empty);
    T* outr = out + row * sk;
    for (int64_t c0 = int64_t(threadIdx.x) * N; c0 < sk; c0 += step) {
      P p{};
      if (!empty && c0 + N > v.lo && c0 < v.hi) p = *reinterpret_cast<const P*>(xr + c0);
      P o;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const A e =
            !empty && v.visible(c0 + j) ? normalized(exp_shifted(scaled_score(to_acc(p.v[j]), scale), mx), inv) : A(0);
        o.v[j] = from_acc<T>(e);
      }
      *reinterpret_cast<P*>(outr + c0) = o;
    }
  }
}

template <typename T, int ITEMS>
cudaError_t launch_forward_warp(const T* x, T* out, int64_t rows, int64_t sk, acc_t<T> scale, const RowRule& rule,
                                bool packed, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const int64_t blocks = std::min<int64_t>((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock, kMaxBlocks);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpRowsPerBlock * 32);
  if constexpr (ITEMS >= kPack) {
    if (packed) {
      forward_warp_kernel<T, ITEMS, kPack><<<grid, block, 0, stream>>>(x, out, rows, sk, scale, rule);
      return cudaGetLastError();
    }
  }
  forward_warp_kernel<T, ITEMS, 1><<<grid, block, 0, stream>>>(x, out, rows, sk, scale, rule);
  return cudaGetLastError();
}

/// Threads per block of a block-per-row kernel: enough for ~4 packs each, 128 to 1024.
inline int block_threads(int64_t packs) {
  int threads = 128;
  while (threads < 1024 && threads * 4 < packs) threads *= 2;
  return threads;
}

/// \brief Calls f(std::integral_constant<int, N>{}) with N the smallest power of two (1..32) such that a
/// warp holding N elements per lane covers a row of sk <= kMaxWarpCols: the warp kernels' template argument.
template <typename F>
cudaError_t with_warp_items(int64_t sk, F&& f) {
  if (sk <= 32) return f(std::integral_constant<int, 1>{});
  if (sk <= 64) return f(std::integral_constant<int, 2>{});
  if (sk <= 128) return f(std::integral_constant<int, 4>{});
  if (sk <= 256) return f(std::integral_constant<int, 8>{});
  if (sk <= 512) return f(std::integral_constant<int, 16>{});
  return f(std::integral_constant<int, 32>{});
}

template <typename T>
cudaError_t launch_forward(const T* x, T* out, int64_t rows, int64_t sk, acc_t<T> scale, const RowRule& rule,
                           cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const bool packed = pack_width<T>(sk, {x, out}) == kPack;
  if (sk <= kMaxWarpCols) {
    return with_warp_items(sk, [&](auto items) {
      return launch_forward_warp<T, decltype(items)::value>(x, out, rows, sk, scale, rule, packed, stream);
    });
  }
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, kMaxBlocks)));
  if (packed) {
    forward_block_kernel<T, kPack><<<grid, block_threads(sk / kPack), 0, stream>>>(x, out, rows, sk, scale, rule);
  } else {
    forward_block_kernel<T, 1><<<grid, block_threads(sk), 0, stream>>>(x, out, rows, sk, scale, rule);
  }
  return cudaGetLastError();
}

// ---- backward -------------------------------------------------------------------------------------

// grad = scale * p * (g - dot(g, p)), one warp per row with both rows in registers (layout as forward).
template <typename T, int ITEMS, int N>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32)
    backward_warp_kernel(const T* __restrict__ grad, const T* __restrict__ probs, T* __restrict__ grad_scores,
                         int64_t rows, int64_t sk, acc_t<T> scale) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  constexpr int kPacks = ITEMS / N;
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * int64_t(kWarpRowsPerBlock) + threadIdx.x / 32; row < rows;
       row += int64_t(gridDim.x) * kWarpRowsPerBlock) {
    A g[ITEMS], p[ITEMS];
    A dot = 0;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t c0 = (int64_t(k) * 32 + lane) * N;
      P gp{}, pp{};
      if (c0 < sk) {
        gp = *reinterpret_cast<const P*>(grad + row * sk + c0);
        pp = *reinterpret_cast<const P*>(probs + row * sk + c0);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        g[k * N + j] = c0 < sk ? to_acc(gp.v[j]) : A(0);
        p[k * N + j] = c0 < sk ? to_acc(pp.v[j]) : A(0);
        dot += g[k * N + j] * p[k * N + j];
      }
    }
    dot = warp_sum(dot);
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t c0 = (int64_t(k) * 32 + lane) * N;
      if (c0 >= sk) continue;
      P o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = from_acc<T>(grad_score(g[k * N + j], p[k * N + j], dot, scale));
      *reinterpret_cast<P*>(grad_scores + row * sk + c0) = o;
    }
  }
}

// One block per row: sweep 1 sums g * p, sweep 2 writes the gradient.
template <typename T, int N>
__global__ void backward_block_kernel(const T* __restrict__ grad, const T* __restrict__ probs,
                                      T* __restrict__ grad_scores, int64_t rows, int64_t sk, acc_t<T> scale) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  __shared__ A shared[32];
  const int64_t step = int64_t(blockDim.x) * N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* gr = grad + row * sk;
    const T* pr = probs + row * sk;
    A part = 0;
    for (int64_t c0 = int64_t(threadIdx.x) * N; c0 < sk; c0 += step) {
      const P gp = *reinterpret_cast<const P*>(gr + c0), pp = *reinterpret_cast<const P*>(pr + c0);
#pragma unroll
      for (int j = 0; j < N; ++j) part += to_acc(gp.v[j]) * to_acc(pp.v[j]);
    }
    const A dot = block_sum(part, shared);
    T* outr = grad_scores + row * sk;
    for (int64_t c0 = int64_t(threadIdx.x) * N; c0 < sk; c0 += step) {
      const P gp = *reinterpret_cast<const P*>(gr + c0), pp = *reinterpret_cast<const P*>(pr + c0);
      P o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = from_acc<T>(grad_score(to_acc(gp.v[j]), to_acc(pp.v[j]), dot, scale));
      *reinterpret_cast<P*>(outr + c0) = o;
    }
  }
}

template <typename T, int ITEMS>
cudaError_t launch_backward_warp(const T* grad, const T* probs, T* out, int64_t rows, int64_t sk, acc_t<T> scale,
                                 bool packed, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const int64_t blocks = std::min<int64_t>((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock, kMaxBlocks);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpRowsPerBlock * 32);
  if constexpr (ITEMS >= kPack) {
    if (packed) {
      backward_warp_kernel<T, ITEMS, kPack><<<grid, block, 0, stream>>>(grad, probs, out, rows, sk, scale);
      return cudaGetLastError();
    }
  }
  backward_warp_kernel<T, ITEMS, 1><<<grid, block, 0, stream>>>(grad, probs, out, rows, sk, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const T* grad, const T* probs, T* out, int64_t rows, int64_t sk, acc_t<T> scale,
                            cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const bool packed = pack_width<T>(sk, {grad, probs, out}) == kPack;
  if (sk <= kMaxWarpCols) {
    return with_warp_items(sk, [&](auto items) {
      return launch_backward_warp<T, decltype(items)::value>(grad, probs, out, rows, sk, scale, packed, stream);
    });
  }
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, kMaxBlocks)));
  if (packed) {
    backward_block_kernel<T, kPack><<<grid, block_threads(sk / kPack), 0, stream>>>(grad, probs, out, rows, sk, scale);
  } else {
    backward_block_kernel<T, 1><<<grid, block_threads(sk), 0, stream>>>(grad, probs, out, rows, sk, scale);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t scaled_masked_softmax_forward(const kernels::ScaledMaskedSoftmaxForward& p, cudaStream_t stream) {
  NvtxRange range("megacore.scaled_masked_softmax");
  if (p.rows == 0 || p.sk == 0) return cudaSuccess;
  const RowRule rule{p.mask, 1, 0, false};
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return launch_forward<T>(static_cast<const T*>(p.scores), static_cast<T*>(p.out), p.rows, p.sk,
                             static_cast<acc_t<T>>(p.scale), rule, stream);
  });
  return cudaSuccess;
}

cudaError_t scaled_causal_softmax_forward(const kernels::ScaledCausalSoftmaxForward& p, cudaStream_t stream) {
  NvtxRange range("megacore.scaled_causal_softmax");
  if (p.rows == 0 || p.sk == 0) return cudaSuccess;
  if (p.sq <= 0 || p.sq > p.sk) return cudaErrorInvalidValue;
  const RowRule rule{MaskRows{}, p.sq, p.window, true};
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return launch_forward<T>(static_cast<const T*>(p.scores), static_cast<T*>(p.out), p.rows, p.sk,
                             static_cast<acc_t<T>>(p.scale), rule, stream);
  });
  return cudaSuccess;
}

cudaError_t scaled_softmax_backward(const kernels::ScaledSoftmaxBackward& p, cudaStream_t stream) {
  NvtxRange range("megacore.scaled_softmax_backward");
  if (p.rows == 0 || p.sk == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return launch_backward<T>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.probs),
                              static_cast<T*>(p.grad_scores), p.rows, p.sk, static_cast<acc_t<T>>(p.scale), stream);
  });
  return cudaSuccess;
}

}  // namespace megacore::cuda
