// Scaled softmax on CUDA: for rows of up to 1024 keys a warp per row with the row held in registers
// (one read, one write); longer rows get a block each, with an online max/sum sweep and a write sweep.
// Padding masks are read in place through a row layout (broadcast dims have stride 0); causal rows
// compute their visible key range [lo, hi) and only exponentiate inside it; an additive bias is read in
// place through its BiasLayout. The bias's backward is a warp (or block) per (bias row, chunk of the score
// rows that read it): it writes those rows' score gradients and sums their bias gradient in registers,
// into a workspace row that a second kernel adds up over the chunks. Which keys a row sees, where its bias
// is, the excluded/empty-row rule and the per-element formulas are kernels/softmax.h's, shared with the CPU
// kernels.
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

/// \brief How rows are masked: by a bool tensor (mask.data not null), causally, both, or not at all.
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
    }
    if (mask.data != nullptr) {
      v.mask = mask.data + mask_row_offset(mask, row);
      v.mask_stride = mask.col_stride;
    }
    return v;
  }
};

/// \brief An additive bias read through its layout (kernels::BiasLayout): [bias rows, sk or 1] of T.
template <typename T>
struct RowBias {
  const T* data;
  kernels::BiasLayout layout;

  /// The bias values of score row `row`: sk of them (per_key) or one.
  __device__ __forceinline__ const T* row_of(int64_t row, int64_t sk) const {
    return data + bias_row(layout, row) * bias_cols(layout, sk);
  }
};

/// \brief The bias of the N keys from c0 of a row whose bias values are `row` (one value for all keys when
///        not per_key).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_bias(const T* row, bool per_key, int64_t c0) {
  if (per_key) return *reinterpret_cast<const Pack<T, N>*>(row + c0);
  Pack<T, N> b;
#pragma unroll
  for (int j = 0; j < N; ++j) b.v[j] = row[0];
  return b;
}

/// \brief The score of element j of a pack: scale * x, plus the bias's element j when BIAS.
template <bool BIAS, typename T, int N>
__device__ __forceinline__ acc_t<T> pack_score(const Pack<T, N>& x, const Pack<T, N>& bias, int j, acc_t<T> scale) {
  if constexpr (BIAS) {
    return biased_score(to_acc(x.v[j]), scale, to_acc(bias.v[j]));
  } else {
    return scaled_score(to_acc(x.v[j]), scale);
  }
}

// ---- forward --------------------------------------------------------------------------------------

// One warp per row. Lane l holds packs l, l + 32, ... of N elements: ITEMS values, ITEMS * 32 >= sk.
// N divides sk, so a pack that starts inside the row ends inside it. BIAS: add `bias` to the scaled scores.
template <typename T, int ITEMS, int N, bool BIAS>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32)
    forward_warp_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t sk, acc_t<T> scale,
                        RowRule rule, RowBias<T> bias) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  constexpr int kPacks = ITEMS / N;
  const int lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x * int64_t(kWarpRowsPerBlock) + threadIdx.x / 32; row < rows;
       row += int64_t(gridDim.x) * kWarpRowsPerBlock) {
    const RowView v = rule.view(row, sk);
    const T* xr = x + row * sk;
    const T* br = BIAS ? bias.row_of(row, sk) : nullptr;
    A vals[ITEMS];
    A mx = excluded_score<A>();
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int64_t c0 = (int64_t(k) * 32 + lane) * N;
      P p{}, b{};
      if (c0 < sk) {
        p = *reinterpret_cast<const P*>(xr + c0);
        if constexpr (BIAS) b = load_bias<T, N>(br, bias.layout.per_key, c0);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        vals[k * N + j] = c0 < sk && v.visible(c0 + j) ? pack_score<BIAS>(p, b, j, scale) : excluded_score<A>();
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
template <typename T, int N, bool BIAS>
__global__ void forward_block_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t sk,
                                     acc_t<T> scale, RowRule rule, RowBias<T> bias) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  __shared__ A shared[32];
  const int64_t step = int64_t(blockDim.x) * N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const RowView v = rule.view(row, sk);
    const T* xr = x + row * sk;
    const T* br = BIAS ? bias.row_of(row, sk) : nullptr;
    A m = excluded_score<A>(), s = 0;
    for (int64_t c0 = (v.lo / N) * N + int64_t(threadIdx.x) * N; c0 < v.hi; c0 += step) {
      const P p = *reinterpret_cast<const P*>(xr + c0);
      P b{};
      if constexpr (BIAS) b = load_bias<T, N>(br, bias.layout.per_key, c0);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if (!v.visible(c0 + j)) continue;
        const A val = pack_score<BIAS>(p, b, j, scale);
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
      P p{}, b{};
      if (!empty && c0 + N > v.lo && c0 < v.hi) {
        p = *reinterpret_cast<const P*>(xr + c0);
        if constexpr (BIAS) b = load_bias<T, N>(br, bias.layout.per_key, c0);
      }
      P o;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const A e = !empty && v.visible(c0 + j) ? normalized(exp_shifted(pack_score<BIAS>(p, b, j, scale), mx), inv) : A(0);
        o.v[j] = from_acc<T>(e);
      }
      *reinterpret_cast<P*>(outr + c0) = o;
    }
  }
}

template <typename T, int ITEMS, bool BIAS>
cudaError_t launch_forward_warp(const T* x, T* out, int64_t rows, int64_t sk, acc_t<T> scale, const RowRule& rule,
                                const RowBias<T>& bias, bool packed, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const int64_t blocks = std::min<int64_t>((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock, kMaxBlocks);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpRowsPerBlock * 32);
  if constexpr (ITEMS >= kPack) {
    if (packed) {
      forward_warp_kernel<T, ITEMS, kPack, BIAS><<<grid, block, 0, stream>>>(x, out, rows, sk, scale, rule, bias);
      return cudaGetLastError();
    }
  }
  forward_warp_kernel<T, ITEMS, 1, BIAS><<<grid, block, 0, stream>>>(x, out, rows, sk, scale, rule, bias);
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

/// BIAS: add `bias` (RowBias) to the scaled scores; else bias is unused.
template <typename T, bool BIAS>
cudaError_t launch_forward(const T* x, T* out, int64_t rows, int64_t sk, acc_t<T> scale, const RowRule& rule,
                           const RowBias<T>& bias, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  // A per-key bias row starts at a multiple of sk: aligned like the scores' rows when its base is.
  const T* bias_packed = BIAS && bias.layout.per_key ? bias.data : nullptr;
  const bool packed = pack_width<T>(sk, {x, out, bias_packed}) == kPack;
  if (sk <= kMaxWarpCols) {
    return with_warp_items(sk, [&](auto items) {
      return launch_forward_warp<T, decltype(items)::value, BIAS>(x, out, rows, sk, scale, rule, bias, packed, stream);
    });
  }
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(rows, kMaxBlocks)));
  if (packed) {
    forward_block_kernel<T, kPack, BIAS>
        <<<grid, block_threads(sk / kPack), 0, stream>>>(x, out, rows, sk, scale, rule, bias);
  } else {
    forward_block_kernel<T, 1, BIAS><<<grid, block_threads(sk), 0, stream>>>(x, out, rows, sk, scale, rule, bias);
  }
  return cudaGetLastError();
}

// ---- backward -------------------------------------------------------------------------------------

// A warp's score row of grad and probs (lane-strided packs of N, ITEMS per lane) loaded into g and p in the
// accumulation type (0 past sk), and dot(g, p) over the row, summed across the warp.
template <typename T, int ITEMS, int N>
__device__ __forceinline__ acc_t<T> load_grad_probs_row(const T* __restrict__ grad, const T* __restrict__ probs,
                                                        int64_t sk, int lane, acc_t<T> (&g)[ITEMS],
                                                        acc_t<T> (&p)[ITEMS]) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  A dot = 0;
#pragma unroll
  for (int k = 0; k < ITEMS / N; ++k) {
    const int64_t c0 = (int64_t(k) * 32 + lane) * N;
    P gp{}, pp{};
    if (c0 < sk) {
      gp = *reinterpret_cast<const P*>(grad + c0);
      pp = *reinterpret_cast<const P*>(probs + c0);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      g[k * N + j] = c0 < sk ? to_acc(gp.v[j]) : A(0);
      p[k * N + j] = c0 < sk ? to_acc(pp.v[j]) : A(0);
      dot += g[k * N + j] * p[k * N + j];
    }
  }
  return warp_sum(dot);
}

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
    const A dot = load_grad_probs_row<T, ITEMS, N>(grad + row * sk, probs + row * sk, sk, lane, g, p);
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

// ---- the bias's backward ------------------------------------------------------------------------------
// Task t = (bias row brow = t / chunks, chunk k = t % chunks) owns score rows [per * k / chunks,
// per * (k + 1) / chunks) of the `per` rows that read bias row brow (softmax::score_row): it writes their
// grad_scores = scale * dS and the sum of their dS into partial[k, brow, :] ([chunks, bias rows, bias cols]
// of the accumulation type), which finish_column_sum adds over the chunks into grad_bias.

struct BiasGradTasks {
  kernels::BiasLayout layout;
  int64_t chunks;

  __device__ __forceinline__ int64_t count() const { return bias_rows(layout) * chunks; }
  __device__ __forceinline__ int64_t per() const { return layout.b * layout.h * layout.sq / bias_rows(layout); }
};

// One warp per task, each score row held in registers (layout as the forward warp kernel); the bias
// gradient of the lane's keys stays in registers across the task's rows.
template <typename T, int ITEMS, int N>
__global__ void __launch_bounds__(kWarpRowsPerBlock * 32)
    bias_backward_warp_kernel(const T* __restrict__ grad, const T* __restrict__ probs, T* __restrict__ grad_scores,
                              acc_t<T>* __restrict__ partial, int64_t sk, BiasGradTasks tasks, acc_t<T> scale) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  constexpr int kPacks = ITEMS / N;
  const int lane = threadIdx.x % 32;
  const kernels::BiasLayout& l = tasks.layout;
  const int64_t per = tasks.per(), brows = bias_rows(l), bcols = bias_cols(l, sk);
  for (int64_t t = blockIdx.x * int64_t(kWarpRowsPerBlock) + threadIdx.x / 32; t < tasks.count();
       t += int64_t(gridDim.x) * kWarpRowsPerBlock) {
    const int64_t brow = t / tasks.chunks, k = t % tasks.chunks;
    A acc[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) acc[i] = 0;
    for (int64_t j = per * k / tasks.chunks; j < per * (k + 1) / tasks.chunks; ++j) {
      const int64_t off = score_row(l, brow, j) * sk;
      A g[ITEMS], p[ITEMS];
      const A dot = load_grad_probs_row<T, ITEMS, N>(grad + off, probs + off, sk, lane, g, p);
#pragma unroll
      for (int kk = 0; kk < kPacks; ++kk) {
        const int64_t c0 = (int64_t(kk) * 32 + lane) * N;
        P o;
#pragma unroll
        for (int jj = 0; jj < N; ++jj) {
          const A d = grad_logit(g[kk * N + jj], p[kk * N + jj], dot);  // 0 past the row's end
          acc[kk * N + jj] += d;
          o.v[jj] = from_acc<T>(scale * d);
        }
        if (c0 < sk) *reinterpret_cast<P*>(grad_scores + off + c0) = o;
      }
    }
    A* out = partial + (k * brows + brow) * bcols;
    if (l.per_key) {
#pragma unroll
      for (int kk = 0; kk < kPacks; ++kk) {
        const int64_t c0 = (int64_t(kk) * 32 + lane) * N;
        if (c0 >= sk) continue;
#pragma unroll
        for (int jj = 0; jj < N; ++jj) out[c0 + jj] = acc[kk * N + jj];
      }
    } else {  // one bias value for the row: the sum over its keys
      A s = 0;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) s += acc[i];
      s = warp_sum(s);
      if (lane == 0) out[0] = s;
    }
  }
}

// One block per task, for rows too long for a warp's registers: per score row, sweep 1 sums g * p and
// sweep 2 writes the score gradient and adds dS into the task's partial row, whose keys each thread owns
// across the rows (the same c0 every row), so it is read and written by one thread only.
template <typename T, int N>
__global__ void bias_backward_block_kernel(const T* __restrict__ grad, const T* __restrict__ probs,
                                           T* __restrict__ grad_scores, acc_t<T>* __restrict__ partial, int64_t sk,
                                           BiasGradTasks tasks, acc_t<T> scale) {
  using A = acc_t<T>;
  using P = Pack<T, N>;
  __shared__ A shared[32];
  const int64_t step = int64_t(blockDim.x) * N;
  const kernels::BiasLayout& l = tasks.layout;
  const int64_t per = tasks.per(), brows = bias_rows(l), bcols = bias_cols(l, sk);
  for (int64_t t = blockIdx.x; t < tasks.count(); t += gridDim.x) {
    const int64_t brow = t / tasks.chunks, k = t % tasks.chunks;
    const int64_t j0 = per * k / tasks.chunks, j1 = per * (k + 1) / tasks.chunks;
    A* out = partial + (k * brows + brow) * bcols;
    A row_sum = 0;  // a bias with one value per row: the sum of dS over the task's keys
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t off = score_row(l, brow, j) * sk;
      A part = 0;
      for (int64_t c0 = int64_t(threadIdx.x) * N; c0 < sk; c0 += step) {
        const P gp = *reinterpret_cast<const P*>(grad + off + c0), pp = *reinterpret_cast<const P*>(probs + off + c0);
#pragma unroll
        for (int jj = 0; jj < N; ++jj) part += to_acc(gp.v[jj]) * to_acc(pp.v[jj]);
      }
      const A dot = block_sum(part, shared);
      for (int64_t c0 = int64_t(threadIdx.x) * N; c0 < sk; c0 += step) {
        const P gp = *reinterpret_cast<const P*>(grad + off + c0), pp = *reinterpret_cast<const P*>(probs + off + c0);
        P o;
#pragma unroll
        for (int jj = 0; jj < N; ++jj) {
          const A d = grad_logit(to_acc(gp.v[jj]), to_acc(pp.v[jj]), dot);
          o.v[jj] = from_acc<T>(scale * d);
          if (l.per_key) {
            out[c0 + jj] = (j == j0 ? A(0) : out[c0 + jj]) + d;
          } else {
            row_sum += d;
          }
        }
        *reinterpret_cast<P*>(grad_scores + off + c0) = o;
      }
    }
    if (!l.per_key) {
      const A s = block_sum(row_sum, shared);
      if (threadIdx.x == 0) out[0] = s;
    }
  }
}

template <typename T, int ITEMS>
cudaError_t launch_bias_backward_warp(const T* grad, const T* probs, T* out, acc_t<T>* partial, int64_t sk,
                                      const BiasGradTasks& tasks, int64_t count, acc_t<T> scale, bool packed,
                                      cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const int64_t blocks = std::min<int64_t>((count + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock, kMaxBlocks);
  const dim3 grid(static_cast<unsigned>(blocks)), block(kWarpRowsPerBlock * 32);
  if constexpr (ITEMS >= kPack) {
    if (packed) {
      bias_backward_warp_kernel<T, ITEMS, kPack><<<grid, block, 0, stream>>>(grad, probs, out, partial, sk, tasks, scale);
      return cudaGetLastError();
    }
  }
  bias_backward_warp_kernel<T, ITEMS, 1><<<grid, block, 0, stream>>>(grad, probs, out, partial, sk, tasks, scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bias_backward(const T* grad, const T* probs, T* out, T* grad_bias, acc_t<T>* partial, int64_t sk,
                                 const kernels::BiasLayout& layout, acc_t<T> scale, cudaStream_t stream) {
  constexpr int kPack = 16 / sizeof(T);
  const int64_t rows = layout.b * layout.h * layout.sq, brows = bias_rows(layout);
  const BiasGradTasks tasks{layout, bias_grad_chunks(rows, brows)};
  const int64_t count = brows * tasks.chunks;
  const bool packed = pack_width<T>(sk, {grad, probs, out}) == kPack;
  cudaError_t err;
  if (sk <= kMaxWarpCols) {
    err = with_warp_items(sk, [&](auto items) {
      return launch_bias_backward_warp<T, decltype(items)::value>(grad, probs, out, partial, sk, tasks, count, scale,
                                                                  packed, stream);
    });
  } else {
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(count, kMaxBlocks)));
    if (packed) {
      bias_backward_block_kernel<T, kPack>
          <<<grid, block_threads(sk / kPack), 0, stream>>>(grad, probs, out, partial, sk, tasks, scale);
    } else {
      bias_backward_block_kernel<T, 1><<<grid, block_threads(sk), 0, stream>>>(grad, probs, out, partial, sk, tasks, scale);
    }
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) return err;
  return finish_column_sum<T>(partial, tasks.chunks, brows * bias_cols(layout, sk), grad_bias, stream);
}

}  // namespace

cudaError_t scaled_masked_softmax_forward(const kernels::ScaledMaskedSoftmaxForward& p, cudaStream_t stream) {
  NvtxRange range("megacore.scaled_masked_softmax");
  if (p.rows == 0 || p.sk == 0) return cudaSuccess;
  const RowRule rule{p.mask, 1, 0, false};
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return launch_forward<T, false>(static_cast<const T*>(p.scores), static_cast<T*>(p.out), p.rows, p.sk,
                                    static_cast<acc_t<T>>(p.scale), rule, RowBias<T>{}, stream);
  });
  return cudaSuccess;
}

cudaError_t scaled_causal_softmax_forward(const kernels::ScaledCausalSoftmaxForward& p, cudaStream_t stream) {
  NvtxRange range("megacore.scaled_causal_softmax");
  if (p.rows == 0 || p.sk == 0) return cudaSuccess;
  if (p.sq <= 0 || p.sq > p.sk) return cudaErrorInvalidValue;
  const RowRule rule{MaskRows{}, p.sq, p.window, true};
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return launch_forward<T, false>(static_cast<const T*>(p.scores), static_cast<T*>(p.out), p.rows, p.sk,
                                    static_cast<acc_t<T>>(p.scale), rule, RowBias<T>{}, stream);
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

cudaError_t scaled_bias_softmax_forward(const kernels::ScaledBiasSoftmaxForward& p, cudaStream_t stream) {
  NvtxRange range("megacore.scaled_bias_softmax");
  const kernels::BiasLayout& l = p.bias_layout;
  const int64_t rows = l.b * l.h * l.sq;
  if (rows == 0 || p.sk == 0) return cudaSuccess;
  if (p.causal && (l.sq <= 0 || l.sq > p.sk)) return cudaErrorInvalidValue;
  const RowRule rule{p.mask, l.sq, p.causal ? p.window : 0, p.causal};
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return launch_forward<T, true>(static_cast<const T*>(p.scores), static_cast<T*>(p.out), rows, p.sk,
                                   static_cast<acc_t<T>>(p.scale), rule, RowBias<T>{static_cast<const T*>(p.bias), l},
                                   stream);
  });
  return cudaSuccess;
}

cudaError_t scaled_bias_softmax_backward(const kernels::ScaledBiasSoftmaxBackward& p, cudaStream_t stream) {
  NvtxRange range("megacore.scaled_bias_softmax_backward");
  const kernels::BiasLayout& l = p.bias_layout;
  if (l.b * l.h * l.sq == 0 || p.sk == 0) return cudaSuccess;  // the caller zeroes grad_bias
  if (p.workspace == nullptr) return cudaErrorInvalidValue;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return launch_bias_backward<T>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.probs),
                                   static_cast<T*>(p.grad_scores), static_cast<T*>(p.grad_bias),
                                   static_cast<acc_t<T>*>(p.workspace), p.sk, l, static_cast<acc_t<T>>(p.scale),
                                   stream);
  });
  return cudaSuccess;
}

}  // namespace megacore::cuda
