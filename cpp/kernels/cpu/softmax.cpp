// Scaled softmax forward (padding mask, causal/sliding window) and its backward on CPU: one task per
// block of rows, each row done in three vectorized sweeps (max, exp + sum, normalize) over a buffer of
// one row in the accumulation type, so a row is read from memory once and stays in cache. Which keys a
// row sees, the excluded/empty-row rule and the per-element formulas are kernels/softmax.h's, shared with
// the CUDA kernels.
#include "kernels/softmax.h"

#include <cstring>
#include <vector>

#include "kernels/cpu/vec.h"

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

using namespace kernels::softmax;

/// `s` with excluded_score in the lanes whose key the mask excludes (only the first n <= size lanes are
/// read; keys are 1 apart).
template <typename A>
inline Vectorized<A> apply_mask(const Vectorized<A>& s, const bool* m, int64_t n) {
  using Vec = Vectorized<A>;
  constexpr int64_t S = Vec::size();
  // Padding masks are mostly all-0 or all-1 per vector: test a full vector's bytes 8 at a time.
  if constexpr (S % 8 == 0) {
    if (n == S) {
      const auto* bytes = reinterpret_cast<const uint8_t*>(m);
      uint64_t any = 0, all = ~uint64_t(0);
      for (int64_t i = 0; i < S; i += 8) {
        uint64_t w;
        std::memcpy(&w, bytes + i, 8);
        any |= w;
        all &= w;
      }
      if (any == 0) return s;
      if (all == 0x0101010101010101ull) return excluded_score<Vec>();  // torch bools are 0 or 1
    }
  }
  alignas(64) A lanes[S] = {};
  for (int64_t i = 0; i < n; ++i) lanes[i] = key_excluded(m, 1, i) ? A(1) : A(0);
  return Vec::blendv(s, excluded_score<Vec>(), Vec::loadu(lanes) != Vec(A(0)));
}

/// out[0, n) = softmax(scale * x[0, n)) with keys where m is set excluded (m may be null). `buf` holds n
/// values of the accumulation type and may alias out when T is the accumulation type. An empty row (no
/// visible key, or only -inf scores) is zeros.
template <typename T>
void softmax_row(const T* x, const bool* m, T* out, acc_t<T>* buf, int64_t n, acc_t<T> scale) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t S = kStep<T>;
  const Vec vscale(scale);
  // Sweep 1: the max of the scaled scores; with a mask the masked scaled scores go to buf so that the
  // mask is read once.
  Vec vmax = excluded_score<Vec>();
  int64_t c = 0;
  for (; c + S <= n; c += S) {
    Vec s = scaled_score(load_vec(x + c), vscale);
    if (m) {
      s = apply_mask(s, m + c, S);
      s.store(buf + c);
    }
    vmax = at::vec::maximum(vmax, s);
  }
  if (c < n) {
    const int64_t r = n - c;
    Vec s = Vec::set(excluded_score<Vec>(), scaled_score(load_vec(x + c, r), vscale), r);
    if (m) {
      s = apply_mask(s, m + c, r);
      s.store(buf + c, r);
    }
    vmax = at::vec::maximum(vmax, s);
  }
  const A mx = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  if (row_is_empty(mx)) {
    std::fill(out, out + n, T(0));
    return;
  }
  // Sweep 2: e = exp(s - max) into buf (0 for excluded keys), and sum(e), long rows in blocks.
  const Vec vmx(mx);
  const A sum = sum_in_blocks(n, [&](int64_t c, int64_t end) {
    Vec vsum(A(0));
    for (; c + S <= end; c += S) {
      const Vec s = m ? Vec::loadu(buf + c) : scaled_score(load_vec(x + c), vscale);
      const Vec e = exp_shifted(s, vmx);
      e.store(buf + c);
      vsum += e;
    }
    if (c < end) {
      const int64_t r = end - c;
      const Vec s = m ? Vec::loadu(buf + c, r) : scaled_score(load_vec(x + c, r), vscale);
      const Vec e = Vec::set(Vec(A(0)), exp_shifted(s, vmx), r);
      e.store(buf + c, r);
      vsum += e;
    }
    return at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, vsum);
  });
  // Sweep 3: normalize, rounding once to T.
  const Vec inv(inv_sum(sum, false));
  for (c = 0; c + S <= n; c += S) store_vec(out + c, normalized(Vec::loadu(buf + c), inv));
  if (c < n) store_vec(out + c, normalized(Vec::loadu(buf + c, n - c), inv), n - c);
}

/// A row buffer of the accumulation type per task; none needed when T is the accumulation type (out is used).
template <typename T>
struct RowBuffer {
  std::vector<acc_t<T>> data;
  acc_t<T>* get(T* out, int64_t n) {
    if constexpr (std::is_same_v<T, acc_t<T>>) {
      return out;
    } else {
      if (static_cast<int64_t>(data.size()) < n) data.resize(n);
      return data.data();
    }
  }
};

template <typename T>
void masked_forward_impl(const T* x, const kernels::MaskRows& mask, T* out, int64_t rows, int64_t sk, double scale) {
  at::parallel_for(0, rows, row_grain(sk), [&](int64_t begin, int64_t end) {
    RowBuffer<T> buf;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * sk;
      T* outr = out + r * sk;
      const bool* mr = mask.data ? mask.data + mask_row_offset(mask, r) : nullptr;
      if (mr && mask.col_stride == 0) {  // one mask value for the whole row
        if (key_excluded(mr, 0, 0)) {    // every key excluded: an empty row
          std::fill(outr, outr + sk, T(0));
          continue;
        }
        mr = nullptr;
      }
      softmax_row<T>(xr, mr, outr, buf.get(outr, sk), sk, static_cast<acc_t<T>>(scale));
    }
  });
}

template <typename T>
void causal_forward_impl(const T* x, T* out, int64_t rows, int64_t sq, int64_t sk, double scale, int64_t window) {
  at::parallel_for(0, rows, row_grain(sk), [&](int64_t begin, int64_t end) {
    RowBuffer<T> buf;
    for (int64_t r = begin; r < end; ++r) {
      const auto [lo, hi] = causal_keys(r, sq, sk, window);  // never empty
      T* outr = out + r * sk;
      std::fill(outr, outr + lo, T(0));
      std::fill(outr + hi, outr + sk, T(0));
      softmax_row<T>(x + r * sk + lo, nullptr, outr + lo, buf.get(outr + lo, hi - lo), hi - lo,
                     static_cast<acc_t<T>>(scale));
    }
  });
}

template <typename T>
void backward_impl(const T* grad, const T* probs, T* grad_scores, int64_t rows, int64_t sk, double scale) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  at::parallel_for(0, rows, row_grain(sk), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = grad + r * sk;
      const T* p = probs + r * sk;
      T* gs = grad_scores + r * sk;
      // dot = sum(grad_out * probs); the partial loads fill the unused lanes with 0.
      const A dot = sum_in_blocks(sk, [&](int64_t c, int64_t end) {
        Vec vdot(A(0));
        for (; c + S <= end; c += S) vdot += load_vec(g + c) * load_vec(p + c);
        if (c < end) vdot += load_vec(g + c, end - c) * load_vec(p + c, end - c);
        return at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, vdot);
      });
      const Vec vd(dot), vs(static_cast<A>(scale));
      int64_t c = 0;
      for (; c + S <= sk; c += S) store_vec(gs + c, grad_score(load_vec(g + c), load_vec(p + c), vd, vs));
      if (c < sk) {
        const int64_t n = sk - c;
        store_vec(gs + c, grad_score(load_vec(g + c, n), load_vec(p + c, n), vd, vs), n);
      }
    }
  });
}

}  // namespace

void scaled_masked_softmax_forward(const kernels::ScaledMaskedSoftmaxForward& p) {
  if (p.rows == 0 || p.sk == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    masked_forward_impl<T>(static_cast<const T*>(p.scores), p.mask, static_cast<T*>(p.out), p.rows, p.sk, p.scale);
  });
}

void scaled_causal_softmax_forward(const kernels::ScaledCausalSoftmaxForward& p) {
  if (p.rows == 0 || p.sk == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    causal_forward_impl<T>(static_cast<const T*>(p.scores), static_cast<T*>(p.out), p.rows, p.sq, p.sk, p.scale,
                           p.window);
  });
}

void scaled_softmax_backward(const kernels::ScaledSoftmaxBackward& p) {
  if (p.rows == 0 || p.sk == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    backward_impl<T>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.probs),
                     static_cast<T*>(p.grad_scores), p.rows, p.sk, p.scale);
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
