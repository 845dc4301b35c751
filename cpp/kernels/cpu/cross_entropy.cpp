// Softmax cross-entropy on CPU, parallel over rows. Forward/stats read each row from memory once: the
// row goes in L1-sized chunks, each chunk's max is taken first, the running sum of exponentials is
// rescaled when the max grows, then the chunk's exponentials (relative to the running max) are added
// while it is still in L1. Backward is one pass per row recomputing the softmax from the saved lse. The
// per-element formulas (exp terms, rescaling, lse, loss, gradient) are kernels/cross_entropy.h's, shared
// with the CUDA kernels.
#include "kernels/cross_entropy.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <limits>

#include "kernels/cpu/vec.h"

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

namespace ce = kernels::cross_entropy;

// Elements per chunk (a multiple of every vector width): 8 KiB of fp32, well inside L1.
constexpr int64_t kChunk = 2048;

template <typename A>
inline A vec_max_all(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return at::vec::maximum(a, b); },
                                    v);
}

template <typename A>
inline A vec_sum_all(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return a + b; }, v);
}

template <typename A>
struct RowStats {
  A max;  // max of the row
  A sum;  // sum of exp(x - max)
};

/// \brief Max and sum of exp(x - max) of one row x[0, V), reading it from memory once. A NaN anywhere
///        gives NaN; an all -inf row gives (-inf, 0).
template <typename T>
RowStats<acc_t<T>> row_stats(const T* x, int64_t V) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  // Reduced types are converted once into `buf`, which the exp pass reads back; fp32/fp64 re-read x.
  alignas(64) A buf[kReduced<T> ? kChunk : 1];
  // One vector of the chunk: element i of p[0, n), the tail padded with -inf (exp gives 0).
  auto load = [&](const T* p, int64_t i, int64_t n) -> Vec {
    if (i + S <= n) return load_vec(p + i);
    return Vec::set(Vec(kNegInf), load_vec(p + i, n - i), n - i);
  };

  A m = kNegInf;
  Vec s0(A(0)), s1(A(0));  // the current chunk's sum
  double total = 0;        // the finished chunks' sum; both relative to m
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const T* p = x + c0;
    const int64_t n = std::min(kChunk, V - c0);
    Vec m0(kNegInf), m1(kNegInf);
    int64_t i = 0;
    for (; i + 2 * S <= n; i += 2 * S) {
      const Vec a = load_vec(p + i), b = load_vec(p + i + S);
      if constexpr (kReduced<T>) a.store(buf + i), b.store(buf + i + S);
      m0 = at::vec::maximum(m0, a);
      m1 = at::vec::maximum(m1, b);
    }
    for (; i < n; i += S) {
      const Vec a = load(p, i, n);
      if constexpr (kReduced<T>) a.store(buf + i);
      m0 = at::vec::maximum(m0, a);
    }
    const A cm = vec_max_all(at::vec::maximum(m0, m1));
    if (std::isnan(cm)) return {cm, cm};
    if (cm > m) {  // the running max grows: rescale the sum so far (exp(-inf) = 0 on the first chunk)
      const A scale = ce::rescale(m, cm);
      s0 = s0 * Vec(scale);
      s1 = s1 * Vec(scale);
      total *= scale;
      m = cm;
    }
    if (m == kNegInf) continue;  // everything so far is -inf and adds 0 (exp(-inf - -inf) would be NaN)
    const Vec mv(m);
    i = 0;
    for (; i + 2 * S <= n; i += 2 * S) {
      // This pass only computes: fetch the next chunk (or row: rows are contiguous) meanwhile. Prefetching
      // past the end of the tensor is harmless.
      for (int64_t b = 0; b < 2 * S * int64_t(sizeof(T)); b += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(p + n + i) + b);
      }
      if constexpr (kReduced<T>) {
        s0 += ce::exp_term(Vec::loadu(buf + i), mv);
        s1 += ce::exp_term(Vec::loadu(buf + i + S), mv);
      } else {
        s0 += ce::exp_term(load_vec(p + i), mv);
        s1 += ce::exp_term(load_vec(p + i + S), mv);
      }
    }
    for (; i < n; i += S) {
      if constexpr (kReduced<T>) {
        s0 += ce::exp_term(Vec::loadu(buf + i), mv);
      } else {
        s0 += ce::exp_term(load(p, i, n), mv);
      }
    }
    // Every chunk hands its sum to the double total, so a lane adds at most kChunk / (2 S) terms (128 with
    // AVX2). Lanes that summed a whole kSumBlock (cpu/vec.h) added, in a row of equal logits, the same
    // exponential 4,096 times each, rounding the same way every time: a 2^31-element row's lse came out
    // 1.3e-6 too large (relative) with AVX2.
    total += vec_sum_all(s0 + s1);
    s0 = s1 = Vec(A(0));
  }
  return {m, static_cast<A>(total)};
}

/// \brief Calls f(const I* target) with the target's index type (int32 or int64).
template <typename F>
void with_target(const void* target, bool target_int32, const F& f) {
  if (target_int32) {
    f(static_cast<const int32_t*>(target));
  } else {
    f(static_cast<const int64_t*>(target));
  }
}

template <typename T, typename I>
void forward_impl(const T* x, const I* target, acc_t<T>* loss, acc_t<T>* lse, int64_t rows, int64_t V,
                  int64_t ignore_index) {
  using A = acc_t<T>;
  at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * V;
      const RowStats<A> st = row_stats(xr, V);
      const A l = ce::lse(st.max, st.sum);
      const int64_t t = target[r];
      lse[r] = l;
      loss[r] = t == ignore_index ? A(0) : ce::loss(l, static_cast<A>(xr[t]));
    }
  });
}

template <typename T, typename I>
void stats_impl(const T* x, const I* target, acc_t<T>* max, acc_t<T>* sum_exp, acc_t<T>* target_logit, int64_t rows,
                int64_t V, int64_t vocab_start, int64_t ignore_index) {
  using A = acc_t<T>;
  at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * V;
      const RowStats<A> st = row_stats(xr, V);
      max[r] = st.max;
      sum_exp[r] = st.sum;
      const int64_t local = ce::local_target(target[r], vocab_start, V, ignore_index);
      target_logit[r] = local >= 0 ? static_cast<A>(xr[local]) : A(0);
    }
  });
}

template <typename T, typename I>
void backward_impl(const acc_t<T>* grad_loss, const T* x, const I* target, const acc_t<T>* lse, T* grad, int64_t rows,
                   int64_t V, int64_t vocab_start, int64_t ignore_index) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * V;
      T* gr = grad + r * V;
      const int64_t t = target[r];
      if (t == ignore_index) {
        std::memset(static_cast<void*>(gr), 0, sizeof(T) * V);  // all-zero bits are +0 in every float type
        continue;
      }
      const A g = grad_loss[r], l = lse[r];
      if (std::isnan(l)) {  // a NaN in the row: fast_exp would clamp it to a finite value
        std::fill(gr, gr + V, static_cast<T>(std::numeric_limits<A>::quiet_NaN()));
        continue;
      }
      // Every element without the one-hot term first (onehot = 0)...
      const Vec gv(g), lv(l), zero(A(0));
      int64_t i = 0;
      for (; i + 2 * S <= V; i += 2 * S) {
        const Vec a = ce::grad(gv, load_vec(xr + i), lv, zero), b = ce::grad(gv, load_vec(xr + i + S), lv, zero);
        store_vec(gr + i, a);
        store_vec(gr + i + S, b);
      }
      for (; i < V; i += S) {
        const int64_t n = std::min(S, V - i);
        const Vec a = ce::grad(gv, load_vec(xr + i, n), lv, zero);
        if (n == S) {
          store_vec(gr + i, a);
        } else {
          store_vec(gr + i, a, n);
        }
      }
      // ...then the target's element again with it (onehot = 1), rounded once.
      const int64_t local = ce::local_target(t, vocab_start, V, ignore_index);
      if (local >= 0) gr[local] = static_cast<T>(ce::grad(g, static_cast<A>(xr[local]), l, A(1)));
    }
  });
}

}  // namespace

void cross_entropy_forward(const kernels::CrossEntropyForward& p) {
  if (p.rows == 0 || p.vocab == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    using A = acc_t<T>;
    with_target(p.target, p.target_int32, [&](const auto* tp) {
      forward_impl<T>(static_cast<const T*>(p.logits), tp, static_cast<A*>(p.loss), static_cast<A*>(p.lse), p.rows,
                      p.vocab, p.ignore_index);
    });
  });
}

void cross_entropy_backward(const kernels::CrossEntropyBackward& p) {
  if (p.rows == 0 || p.vocab == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    using A = acc_t<T>;
    with_target(p.target, p.target_int32, [&](const auto* tp) {
      backward_impl<T>(static_cast<const A*>(p.grad_loss), static_cast<const T*>(p.logits), tp,
                       static_cast<const A*>(p.lse), static_cast<T*>(p.grad_logits), p.rows, p.vocab, p.vocab_start,
                       p.ignore_index);
    });
  });
}

void vocab_parallel_cross_entropy_stats(const kernels::VocabParallelCrossEntropyStats& p) {
  if (p.rows == 0 || p.vocab == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    using A = acc_t<T>;
    with_target(p.target, p.target_int32, [&](const auto* tp) {
      stats_impl<T>(static_cast<const T*>(p.logits), tp, static_cast<A*>(p.max), static_cast<A*>(p.sum_exp),
                    static_cast<A*>(p.target_logit), p.rows, p.vocab, p.vocab_start, p.ignore_index);
    });
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
