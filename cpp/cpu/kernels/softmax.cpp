// Scaled softmax forward (padding mask, causal/sliding window) and its backward on CPU: one task per
// block of rows, each row done in three vectorized sweeps (max, exp + sum, normalize) over a buffer of
// one row in the accumulation type, so a row is read from memory once and stays in cache.
#include "cpu/softmax.h"

#include <ATen/Dispatch.h>

#include <cstring>
#include <limits>
#include <vector>

#include "cpu/vec.h"

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

template <typename A>
inline Vectorized<A> neg_inf() {
  return Vectorized<A>(-std::numeric_limits<A>::infinity());
}

/// `s` with -inf in the lanes whose mask byte is set (only the first n <= size lanes are read).
template <typename A>
inline Vectorized<A> apply_mask(const Vectorized<A>& s, const bool* m, int64_t n) {
  constexpr int64_t S = Vectorized<A>::size();
  const auto* bytes = reinterpret_cast<const uint8_t*>(m);
  // Padding masks are mostly all-0 or all-1 per vector: test a full vector's bytes 8 at a time.
  if constexpr (S % 8 == 0) {
    if (n == S) {
      uint64_t any = 0, all = ~uint64_t(0);
      for (int64_t i = 0; i < S; i += 8) {
        uint64_t w;
        std::memcpy(&w, bytes + i, 8);
        any |= w;
        all &= w;
      }
      if (any == 0) return s;
      if (all == 0x0101010101010101ull) return neg_inf<A>();  // torch bools are 0 or 1
    }
  }
  alignas(64) A lanes[S] = {};
  for (int64_t i = 0; i < n; ++i) lanes[i] = bytes[i] != 0 ? A(1) : A(0);
  return Vectorized<A>::blendv(s, neg_inf<A>(), Vectorized<A>::loadu(lanes) != Vectorized<A>(A(0)));
}

/// out[0, n) = softmax(scale * x[0, n)) with keys where m is set excluded (m may be null). `buf` holds n
/// values of the accumulation type and may alias out when T is the accumulation type. A row with no
/// visible key (or whose visible scores are all -inf) is zeros.
template <typename T>
void softmax_row(const T* x, const bool* m, T* out, acc_t<T>* buf, int64_t n, acc_t<T> scale) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t S = kStep<T>;
  const Vec vscale(scale);
  // Sweep 1: the max of the scaled scores; with a mask the masked scaled scores go to buf so that the
  // mask is read once.
  Vec vmax = neg_inf<A>();
  int64_t c = 0;
  for (; c + S <= n; c += S) {
    Vec s = load_vec(x + c) * vscale;
    if (m) {
      s = apply_mask(s, m + c, S);
      s.store(buf + c);
    }
    vmax = at::vec::maximum(vmax, s);
  }
  if (c < n) {
    const int64_t r = n - c;
    Vec s = Vec::set(neg_inf<A>(), load_vec(x + c, r) * vscale, r);
    if (m) {
      s = apply_mask(s, m + c, r);
      s.store(buf + c, r);
    }
    vmax = at::vec::maximum(vmax, s);
  }
  const A mx = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  if (mx == -std::numeric_limits<A>::infinity()) {
    std::fill(out, out + n, T(0));
    return;
  }
  // Sweep 2: e = exp(s - max) into buf (exp(-inf) = 0 for masked keys), and sum(e), long rows in blocks.
  const Vec vmx(mx);
  const A sum = sum_in_blocks(n, [&](int64_t c, int64_t end) {
    Vec vsum(A(0));
    for (; c + S <= end; c += S) {
      const Vec s = m ? Vec::loadu(buf + c) : load_vec(x + c) * vscale;
      const Vec e = (s - vmx).exp_u20();
      e.store(buf + c);
      vsum += e;
    }
    if (c < end) {
      const int64_t r = end - c;
      const Vec s = m ? Vec::loadu(buf + c, r) : load_vec(x + c, r) * vscale;
      const Vec e = Vec::set(Vec(A(0)), (s - vmx).exp_u20(), r);
      e.store(buf + c, r);
      vsum += e;
    }
    return at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, vsum);
  });
  // Sweep 3: normalize, rounding once to T.
  const Vec inv(A(1) / sum);
  for (c = 0; c + S <= n; c += S) store_vec(out + c, Vec::loadu(buf + c) * inv);
  if (c < n) store_vec(out + c, Vec::loadu(buf + c, n - c) * inv, n - c);
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
void masked_forward_impl(const T* x, const ops::MaskRows* mask, T* out, int64_t rows, int64_t sk, double scale) {
  const bool* mp = mask ? mask->mask.const_data_ptr<bool>() : nullptr;
  at::parallel_for(0, rows, row_grain(sk), [&](int64_t begin, int64_t end) {
    RowBuffer<T> buf;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * sk;
      T* outr = out + r * sk;
      const bool* mr = mp ? mp + mask->row_offset(r) : nullptr;
      if (mr && mask->col_stride == 0) {  // one mask value for the whole row
        if (*mr) {
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
      // Visible keys [lo, hi]: never empty, since sq <= sk and window >= 1.
      const int64_t hi = r % sq + (sk - sq);
      const int64_t lo = window > 0 ? std::max<int64_t>(0, hi - window + 1) : 0;
      T* outr = out + r * sk;
      std::fill(outr, outr + lo, T(0));
      std::fill(outr + hi + 1, outr + sk, T(0));
      softmax_row<T>(x + r * sk + lo, nullptr, outr + lo, buf.get(outr + lo, hi + 1 - lo), hi + 1 - lo,
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
      for (; c + S <= sk; c += S) store_vec(gs + c, vs * load_vec(p + c) * (load_vec(g + c) - vd));
      if (c < sk) {
        const int64_t n = sk - c;
        store_vec(gs + c, vs * load_vec(p + c, n) * (load_vec(g + c, n) - vd), n);
      }
    }
  });
}

}  // namespace

void scaled_masked_softmax_forward(const at::Tensor& scores, const ops::MaskRows* mask, const at::Tensor& out,
                                   double scale) {
  const int64_t sk = scores.size(-1), rows = sk == 0 ? 0 : scores.numel() / sk;
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "megacore.scaled_masked_softmax", [&] {
    masked_forward_impl<scalar_t>(scores.const_data_ptr<scalar_t>(), mask, out.mutable_data_ptr<scalar_t>(), rows, sk,
                                  scale);
  });
}

void scaled_causal_softmax_forward(const at::Tensor& scores, const at::Tensor& out, double scale, int64_t window) {
  const int64_t sq = scores.size(-2), sk = scores.size(-1), rows = sk == 0 ? 0 : scores.numel() / sk;
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "megacore.scaled_causal_softmax", [&] {
    causal_forward_impl<scalar_t>(scores.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, sq, sk,
                                  scale, window);
  });
}

void scaled_softmax_backward(const at::Tensor& grad_out, const at::Tensor& probs, const at::Tensor& grad_scores,
                             double scale) {
  const int64_t sk = probs.size(-1), rows = sk == 0 ? 0 : probs.numel() / sk;
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, probs.scalar_type(), "megacore.scaled_softmax_backward", [&] {
    backward_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(),
                            grad_scores.mutable_data_ptr<scalar_t>(), rows, sk, scale);
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
