// Scaled softmax forward (padding mask, causal/sliding window, additive bias) and its backward on CPU: one
// task per block of rows, each row done in three vectorized sweeps (max, exp + sum, normalize) over a
// buffer of one row in the accumulation type, so a row is read from memory once and stays in cache. The
// bias's backward sums its gradient while it writes the scores': one task per bias row (or per chunk of
// its score rows). Which keys a row sees, where its bias is, the excluded/empty-row rule and the
// per-element formulas are kernels/softmax.h's, shared with the CUDA kernels.
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

/// An additive bias over a row's keys: bias[c * stride] (stride 1: one value per key, 0: one for the row);
/// data null: none.
template <typename T>
struct RowBias {
  const T* data;
  int64_t stride;
};

/// out[0, n) = softmax(scale * x[0, n) + bias) with keys where m is set excluded (m may be null). `buf`
/// holds n values of the accumulation type and may alias out when T is the accumulation type. An empty
/// row (no visible key, or only -inf scores) is zeros.
template <typename T>
void softmax_row(const T* x, const bool* m, RowBias<T> bias, T* out, acc_t<T>* buf, int64_t n, acc_t<T> scale) {
  using A = acc_t<T>;
  using Vec = Vectorized<A>;
  constexpr int64_t S = kStep<T>;
  const Vec vscale(scale);
  const Vec row_bias(bias.data && bias.stride == 0 ? static_cast<A>(bias.data[0]) : A(0));
  // The score of keys [c, c + r): biased when there is a bias.
  auto score = [&](int64_t c, int64_t r) {
    const Vec xs = r == S ? load_vec(x + c) : load_vec(x + c, r);
    if (!bias.data) return scaled_score(xs, vscale);
    if (bias.stride == 0) return biased_score(xs, vscale, row_bias);
    return biased_score(xs, vscale, r == S ? load_vec(bias.data + c) : load_vec(bias.data + c, r));
  };
  // Sweep 1: the max of the scaled scores; with a mask or a bias the (masked) scores go to buf so that the
  // mask and the bias are read once.
  const bool keep = m || bias.data;
  Vec vmax = excluded_score<Vec>();
  int64_t c = 0;
  for (; c + S <= n; c += S) {
    Vec s = score(c, S);
    if (m) s = apply_mask(s, m + c, S);
    if (keep) s.store(buf + c);
    vmax = at::vec::maximum(vmax, s);
  }
  if (c < n) {
    const int64_t r = n - c;
    Vec s = Vec::set(excluded_score<Vec>(), score(c, r), r);
    if (m) s = apply_mask(s, m + c, r);
    if (keep) s.store(buf + c, r);
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
      const Vec s = keep ? Vec::loadu(buf + c) : scaled_score(load_vec(x + c), vscale);
      const Vec e = exp_shifted(s, vmx);
      e.store(buf + c);
      vsum += e;
    }
    if (c < end) {
      const int64_t r = end - c;
      const Vec s = keep ? Vec::loadu(buf + c, r) : scaled_score(load_vec(x + c, r), vscale);
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
      softmax_row<T>(xr, mr, {}, outr, buf.get(outr, sk), sk, static_cast<acc_t<T>>(scale));
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
      softmax_row<T>(x + r * sk + lo, nullptr, {}, outr + lo, buf.get(outr + lo, hi - lo), hi - lo,
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

template <typename T>
void bias_forward_impl(const T* x, const T* bias, T* out, int64_t sk, const kernels::BiasLayout& layout,
                       const kernels::MaskRows& mask, bool causal, int64_t window, double scale) {
  const int64_t rows = layout.b * layout.h * layout.sq, bcols = bias_cols(layout, sk);
  at::parallel_for(0, rows, row_grain(sk), [&](int64_t begin, int64_t end) {
    RowBuffer<T> buf;
    for (int64_t r = begin; r < end; ++r) {
      // Keys [lo, hi) pass the causal rule (all without it); the mask may exclude more of them.
      const auto [lo, hi] = causal ? causal_keys(r, layout.sq, sk, window) : KeyRange{0, sk};
      T* outr = out + r * sk;
      std::fill(outr, outr + lo, T(0));
      std::fill(outr + hi, outr + sk, T(0));
      const bool* mr = mask.data ? mask.data + mask_row_offset(mask, r) : nullptr;
      if (mr && mask.col_stride == 0) {  // one mask value for the whole row
        if (key_excluded(mr, 0, 0)) {    // every key excluded: an empty row
          std::fill(outr + lo, outr + hi, T(0));
          continue;
        }
        mr = nullptr;
      }
      const T* br = bias + bias_row(layout, r) * bcols;
      const RowBias<T> row_bias{layout.per_key ? br + lo : br, layout.per_key ? 1 : 0};
      softmax_row<T>(x + r * sk + lo, mr ? mr + lo : nullptr, row_bias, outr + lo, buf.get(outr + lo, hi - lo),
                     hi - lo, static_cast<acc_t<T>>(scale));
    }
  });
}

/// The bias gradient of one task: score rows [j0, j1) of bias row `brow` (softmax::score_row). Writes their
/// grad_scores = scale * dS and sets acc[0, bias_cols) to the sum of their dS (per key, or over the row).
template <typename T>
void bias_backward_rows(const T* grad, const T* probs, T* grad_scores, int64_t sk, const kernels::BiasLayout& layout,
                        int64_t brow, int64_t j0, int64_t j1, acc_t<T> scale, acc_t<T>* acc) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  std::fill(acc, acc + bias_cols(layout, sk), A(0));
  const Vec vs(scale);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t off = score_row(layout, brow, j) * sk;
    const T* g = grad + off;
    const T* p = probs + off;
    T* gs = grad_scores + off;
    const A dot = sum_in_blocks(sk, [&](int64_t c, int64_t end) {
      Vec vdot(A(0));
      for (; c + S <= end; c += S) vdot += load_vec(g + c) * load_vec(p + c);
      if (c < end) vdot += load_vec(g + c, end - c) * load_vec(p + c, end - c);
      return at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, vdot);
    });
    const Vec vd(dot);
    Vec row_sum(A(0));  // the keys' sum of dS, for a bias with one value per row
    int64_t c = 0;
    for (; c + S <= sk; c += S) {
      const Vec d = grad_logit(load_vec(g + c), load_vec(p + c), vd);
      store_vec(gs + c, vs * d);
      if (layout.per_key) {
        (Vec::loadu(acc + c) + d).store(acc + c);
      } else {
        row_sum += d;
      }
    }
    if (c < sk) {
      const int64_t n = sk - c;
      const Vec d = grad_logit(load_vec(g + c, n), load_vec(p + c, n), vd);  // 0 in the unused lanes
      store_vec(gs + c, vs * d, n);
      if (layout.per_key) {
        (Vec::loadu(acc + c, n) + d).store(acc + c, n);
      } else {
        row_sum += d;
      }
    }
    if (!layout.per_key) acc[0] += at::vec::vec_reduce_all<A>([](Vec& a, Vec& b) { return a + b; }, row_sum);
  }
}

template <typename T>
void bias_backward_impl(const T* grad, const T* probs, T* grad_scores, T* grad_bias, int64_t sk,
                        const kernels::BiasLayout& layout, double scale) {
  using A = acc_t<T>;
  const int64_t rows = layout.b * layout.h * layout.sq;
  const int64_t brows = bias_rows(layout), bcols = bias_cols(layout, sk), per = rows / brows;
  const int64_t chunks = bias_grad_chunks(rows, brows);
  // One task per (bias row, chunk of its score rows). With one chunk (many bias rows: the usual
  // [1, h, sq, sk] or a full-size bias) a task owns its bias row and rounds it straight into grad_bias;
  // with more (a bias broadcast over most rows, as [1, h, 1, sk]) the chunks' sums are added after, in
  // chunk order.
  std::vector<A> partial(chunks > 1 ? chunks * brows * bcols : 0);  // [chunks, brows, bcols]
  const int64_t grain = std::max<int64_t>(1, row_grain(sk) / std::max<int64_t>(1, per / chunks));
  at::parallel_for(0, brows * chunks, grain, [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(bcols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t brow = t / chunks, k = t % chunks;
      bias_backward_rows<T>(grad, probs, grad_scores, sk, layout, brow, per * k / chunks, per * (k + 1) / chunks,
                            static_cast<A>(scale), acc.data());
      if (chunks == 1) {
        T* out = grad_bias + brow * bcols;
        for (int64_t c = 0; c < bcols; ++c) out[c] = static_cast<T>(acc[c]);
      } else {
        std::copy(acc.begin(), acc.end(), partial.begin() + (k * brows + brow) * bcols);
      }
    }
  });
  if (chunks == 1) return;
  const int64_t n = brows * bcols;
  at::parallel_for(0, n, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      A s = 0;
      for (int64_t k = 0; k < chunks; ++k) s += partial[k * n + e];
      grad_bias[e] = static_cast<T>(s);
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

void scaled_bias_softmax_forward(const kernels::ScaledBiasSoftmaxForward& p) {
  const auto& l = p.bias_layout;
  if (l.b * l.h * l.sq == 0 || p.sk == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    bias_forward_impl<T>(static_cast<const T*>(p.scores), static_cast<const T*>(p.bias), static_cast<T*>(p.out),
                         p.sk, l, p.mask, p.causal, p.window, p.scale);
  });
}

void scaled_bias_softmax_backward(const kernels::ScaledBiasSoftmaxBackward& p) {
  const auto& l = p.bias_layout;
  if (l.b * l.h * l.sq == 0 || p.sk == 0) return;  // the caller zeroes grad_bias
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    bias_backward_impl<T>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.probs),
                          static_cast<T*>(p.grad_scores), static_cast<T*>(p.grad_bias), p.sk, l, p.scale);
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
