// Softmax cross-entropy on CUDA, one block per row (vocabularies are large: 32k-256k). Each thread keeps
// an online (max, sum of exp relative to that max) over its 16-byte packs of the row, rescaling its sum
// when its max grows; the block then reduces the max and the rescaled sums. Rows are read once, with
// 16-byte loads from the first 16-byte boundary of each row (a row of odd length starts anywhere). The
// per-element formulas (exp terms, rescaling, lse, loss, gradient) are kernels/cross_entropy.h's, shared
// with the CPU kernels.
#include <cmath>

#include "kernels/cross_entropy.h"
#include "kernels/cuda/common.cuh"

namespace megacore::cuda {
namespace {

namespace ce = kernels::cross_entropy;

constexpr int kMaxThreads = 1024;

template <int n>
struct Width {
  static constexpr int value = n;
};

/// \brief Running max `m` and sum `s` of exp(x - m) over the values one thread has seen.
template <typename A>
struct Online {
  A m = A(-INFINITY);
  A s = A(0);

  template <int n>
  __device__ __forceinline__ void add(const A* v) {
    A pm = v[0];
#pragma unroll
    for (int k = 1; k < n; ++k) pm = (v[k] > pm || v[k] != v[k]) ? v[k] : pm;  // a NaN sticks
    if (pm > m || pm != pm) {  // the max grows: rescale the sum so far (exp(-inf) = 0 at the start)
      s *= ce::rescale(m, pm);
      m = pm;
    }
    if (m == A(-INFINITY)) return;  // everything so far is -inf and adds 0 (exp(-inf - -inf) is NaN)
#pragma unroll
    for (int k = 0; k < n; ++k) s += ce::exp_term(v[k], m);
  }

  /// \brief This thread's sum relative to the row max M (>= m).
  __device__ __forceinline__ A sum_at(A M) const { return s == A(0) ? A(0) : s * ce::rescale(m, M); }
};

/// \brief Elements of the row at p before its first (N * sizeof(T))-byte boundary (p is aligned to T).
template <typename T, int N>
__device__ __forceinline__ int64_t head_len(const T* p, int64_t V) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % (N * sizeof(T)) / sizeof(T));
  return mis == 0 ? 0 : min(V, static_cast<int64_t>(N) - mis);
}

/// \brief Calls f(Width<n>, const acc_t<T>* values, col) over the thread's share of row xr[0, V): single
///        elements before the first aligned pack and after the last, aligned packs of N in between.
template <int N, typename T, typename F>
__device__ __forceinline__ void for_each_pack(const T* __restrict__ xr, int64_t V, const F& f) {
  using A = acc_t<T>;
  const int64_t tid = threadIdx.x, head = head_len<T, N>(xr, V), packs = (V - head) / N;
  if (tid < head) {
    const A v[1] = {to_acc(xr[tid])};
    f(Width<1>{}, v, tid);
  }
  const auto* pp = reinterpret_cast<const Pack<T, N>*>(xr + head);
  for (int64_t p = tid; p < packs; p += blockDim.x) {
    const Pack<T, N> pk = pp[p];
    A v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = to_acc(pk.v[k]);
    f(Width<N>{}, v, head + p * N);
  }
  for (int64_t c = head + packs * N + tid; c < V; c += blockDim.x) {
    const A v[1] = {to_acc(xr[c])};
    f(Width<1>{}, v, c);
  }
}

// kStats false: out0 = loss, out1 = lse (bad targets lower *bad_row). kStats true: out0 = max,
// out1 = sum of exp(x - max), out2 = target logit in this shard.
template <typename T, typename I, bool kStats>
__global__ void forward_kernel(const T* __restrict__ x, const I* __restrict__ target, acc_t<T>* __restrict__ out0,
                               acc_t<T>* __restrict__ out1, acc_t<T>* __restrict__ out2, int64_t* bad_row,
                               int64_t rows, int64_t V, int64_t vocab_start, int64_t ignore_index) {
  using A = acc_t<T>;
  constexpr int N = 16 / sizeof(T);
  __shared__ A shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * V;
    Online<A> st;
    for_each_pack<N>(xr, V, [&](auto w, const A* v, int64_t) { st.template add<decltype(w)::value>(v); });
    const A M = block_max(st.m, shared, A(-INFINITY));
    const A S = block_sum(st.sum_at(M), shared);
    if (threadIdx.x != 0) continue;
    const int64_t t = target[r];
    if constexpr (kStats) {
      const int64_t local = ce::local_target(t, vocab_start, V, ignore_index);
      out0[r] = M;
      out1[r] = S;
      out2[r] = local >= 0 ? to_acc(xr[local]) : A(0);
    } else {
      const A lse = ce::lse(M, S);
      A loss = A(0);
      if (t != ignore_index) {
        if (t >= 0 && t < V) {
          loss = ce::loss(lse, to_acc(xr[t]));
        } else {
          atomicMin(reinterpret_cast<unsigned long long*>(bad_row), static_cast<unsigned long long>(r));
        }
      }
      out0[r] = loss;
      out1[r] = lse;
    }
  }
}

// N is 16 bytes of T when logits and grad share their alignment, else 1 (the launcher decides), so one
// head length serves both rows.
template <typename T, typename I, int N>
__global__ void backward_kernel(const acc_t<T>* __restrict__ grad_loss, const T* __restrict__ x,
                                const I* __restrict__ target, const acc_t<T>* __restrict__ lse, T* __restrict__ grad,
                                int64_t rows, int64_t V, int64_t vocab_start, int64_t ignore_index) {
  using A = acc_t<T>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * V;
    T* gr = grad + r * V;
    const int64_t t = target[r], tid = threadIdx.x;
    // Ignored rows skip the logits and write 0: g = 0 and l = 0 on zero inputs give 0 * (1 - 0).
    const bool ignored = t == ignore_index;
    const A g = ignored ? A(0) : grad_loss[r], l = ignored ? A(0) : lse[r];
    const int64_t local = ce::local_target(t, vocab_start, V, ignore_index);  // the one-hot column, or -1
    auto value = [&](T xv, int64_t c) {
      const A v = ignored ? A(0) : to_acc(xv);
      return from_acc<T>(ce::grad(g, v, l, c == local ? A(1) : A(0)));
    };
    const int64_t head = head_len<T, N>(xr, V), packs = (V - head) / N;
    if (tid < head) gr[tid] = value(ignored ? T() : xr[tid], tid);
    const auto* xp = reinterpret_cast<const Pack<T, N>*>(xr + head);
    auto* gp = reinterpret_cast<Pack<T, N>*>(gr + head);
    for (int64_t p = tid; p < packs; p += blockDim.x) {
      Pack<T, N> in{}, out;
      if (!ignored) in = xp[p];
#pragma unroll
      for (int k = 0; k < N; ++k) out.v[k] = value(in.v[k], head + p * N + k);
      gp[p] = out;
    }
    for (int64_t c = head + packs * N + tid; c < V; c += blockDim.x) gr[c] = value(ignored ? T() : xr[c], c);
  }
}

/// \brief Threads per row block: enough for about 4 packs each, a power of two in [32, 1024].
int threads_for(int64_t vocab, int pack) {
  const int64_t want = (vocab / pack + 3) / 4;
  int t = 32;
  while (t < kMaxThreads && t < want) t *= 2;
  return t;
}

unsigned blocks_for(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, 1 << 30)); }

template <typename T, typename I, bool kStats>
cudaError_t launch_forward(const void* x, const void* target, void* o0, void* o1, void* o2, int64_t* bad_row,
                           int64_t rows, int64_t V, int64_t vocab_start, int64_t ignore_index, cudaStream_t stream) {
  using A = acc_t<T>;
  forward_kernel<T, I, kStats><<<blocks_for(rows), threads_for(V, 16 / sizeof(T)), 0, stream>>>(
      static_cast<const T*>(x), static_cast<const I*>(target), static_cast<A*>(o0), static_cast<A*>(o1),
      static_cast<A*>(o2), bad_row, rows, V, vocab_start, ignore_index);
  return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t launch_backward(const void* grad_loss, const void* x, const void* target, const void* lse, void* grad,
                            int64_t rows, int64_t V, int64_t vocab_start, int64_t ignore_index, cudaStream_t stream) {
  using A = acc_t<T>;
  constexpr int N = 16 / sizeof(T);
  const bool same_alignment = reinterpret_cast<uintptr_t>(x) % 16 == reinterpret_cast<uintptr_t>(grad) % 16;
  const auto* g = static_cast<const A*>(grad_loss);
  const auto* xp = static_cast<const T*>(x);
  const auto* tp = static_cast<const I*>(target);
  const auto* lp = static_cast<const A*>(lse);
  auto* gp = static_cast<T*>(grad);
  if (same_alignment) {
    backward_kernel<T, I, N><<<blocks_for(rows), threads_for(V, N), 0, stream>>>(g, xp, tp, lp, gp, rows, V,
                                                                                 vocab_start, ignore_index);
  } else {
    backward_kernel<T, I, 1><<<blocks_for(rows), threads_for(V, 1), 0, stream>>>(g, xp, tp, lp, gp, rows, V,
                                                                                 vocab_start, ignore_index);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_forward(const kernels::CrossEntropyForward& p, cudaStream_t stream) {
  NvtxRange range("megacore.cross_entropy");
  if (p.rows == 0 || p.vocab == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return p.target_int32 ? launch_forward<T, int32_t, false>(p.logits, p.target, p.loss, p.lse, nullptr, p.bad_row,
                                                              p.rows, p.vocab, 0, p.ignore_index, stream)
                          : launch_forward<T, int64_t, false>(p.logits, p.target, p.loss, p.lse, nullptr, p.bad_row,
                                                              p.rows, p.vocab, 0, p.ignore_index, stream);
  });
  return cudaSuccess;
}

cudaError_t cross_entropy_backward(const kernels::CrossEntropyBackward& p, cudaStream_t stream) {
  NvtxRange range("megacore.cross_entropy_backward");
  if (p.rows == 0 || p.vocab == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return p.target_int32 ? launch_backward<T, int32_t>(p.grad_loss, p.logits, p.target, p.lse, p.grad_logits, p.rows,
                                                        p.vocab, p.vocab_start, p.ignore_index, stream)
                          : launch_backward<T, int64_t>(p.grad_loss, p.logits, p.target, p.lse, p.grad_logits, p.rows,
                                                        p.vocab, p.vocab_start, p.ignore_index, stream);
  });
  return cudaSuccess;
}

cudaError_t vocab_parallel_cross_entropy_stats(const kernels::VocabParallelCrossEntropyStats& p, cudaStream_t stream) {
  NvtxRange range("megacore.vocab_parallel_cross_entropy_stats");
  if (p.rows == 0 || p.vocab == 0) return cudaSuccess;
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    return p.target_int32 ? launch_forward<T, int32_t, true>(p.logits, p.target, p.max, p.sum_exp, p.target_logit,
                                                             nullptr, p.rows, p.vocab, p.vocab_start, p.ignore_index,
                                                             stream)
                          : launch_forward<T, int64_t, true>(p.logits, p.target, p.max, p.sum_exp, p.target_logit,
                                                             nullptr, p.rows, p.vocab, p.vocab_start, p.ignore_index,
                                                             stream);
  });
  return cudaSuccess;
}

}  // namespace megacore::cuda
