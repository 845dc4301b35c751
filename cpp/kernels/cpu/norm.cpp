// LayerNorm / RMSNorm forward and backward on CPU. Parallel over rows; each row is reduced with vectors
// of the accumulation type while it sits in L1 (an exact two-pass mean/variance, then the output pass).
// The weight/bias gradients are column sums over rows: per-chunk partial rows added in a fixed order.
// The per-element formulas (normalize and affine, grad_x from the row sums) are kernels/norm.h's, shared
// with the CUDA kernels.
#include "kernels/norm.h"

#include <cmath>
#include <utility>
#include <vector>

#include "kernels/cpu/vec.h"

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

namespace norm = kernels::norm;

/// Loads n <= kStep<T> elements (zeros past n); n == kStep<T> is the plain full-width load.
template <typename T>
inline AccVec<T> load_n(const T* p, int64_t n) {
  return n == kStep<T> ? load_vec(p) : load_vec(p, n);
}

/// Stores the first n <= kStep<T> lanes.
template <typename T>
inline void store_n(T* p, const AccVec<T>& v, int64_t n) {
  if (n == kStep<T>) {
    store_vec(p, v);
  } else {
    store_vec(p, v, n);
  }
}

template <typename A>
inline A hsum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](const Vectorized<A>& a, const Vectorized<A>& b) { return a + b; }, v);
}

/// Sum over the row of f(c, n), called on vectors starting at column c with n valid lanes. Four
/// independent accumulators, so consecutive adds do not wait on each other; long rows in blocks
/// (sum_in_blocks).
template <typename A, typename F>
inline A row_sum(int64_t cols, const F& f) {
  using Vec = Vectorized<A>;
  constexpr int64_t S = Vec::size();
  return sum_in_blocks(cols, [&](int64_t c, int64_t end) {
    Vec a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
    for (; c + 4 * S <= end; c += 4 * S) {
      a0 = a0 + f(c, S);
      a1 = a1 + f(c + S, S);
      a2 = a2 + f(c + 2 * S, S);
      a3 = a3 + f(c + 3 * S, S);
    }
    for (; c + S <= end; c += S) a0 = a0 + f(c, S);
    if (c < end) a1 = a1 + f(c, end - c);
    return hsum<A>((a0 + a1) + (a2 + a3));
  });
}

/// Two sums at once: f(c, n) returns a pair of vectors.
template <typename A, typename F>
inline std::pair<A, A> row_sum2(int64_t cols, const F& f) {
  using Vec = Vectorized<A>;
  constexpr int64_t S = Vec::size();
  return sum_in_blocks(cols, [&](int64_t c, int64_t end) {
    Vec a0(A(0)), a1(A(0)), b0(A(0)), b1(A(0));
    for (; c + 2 * S <= end; c += 2 * S) {
      const auto [u0, v0] = f(c, S);
      const auto [u1, v1] = f(c + S, S);
      a0 = a0 + u0, b0 = b0 + v0, a1 = a1 + u1, b1 = b1 + v1;
    }
    for (; c < end; c += S) {
      const auto [u, v] = f(c, std::min<int64_t>(S, end - c));
      a0 = a0 + u, b0 = b0 + v;
    }
    return std::pair<A, A>{hsum<A>(a0 + a1), hsum<A>(b0 + b1)};
  });
}

/// Calls f(c, n) over the row in vectors: full ones (n == S, a constant once inlined), then the tail.
template <int64_t S, typename F>
inline void row_for_each(int64_t cols, const F& f) {
  int64_t c = 0;
  for (; c + S <= cols; c += S) f(c, S);
  if (c < cols) f(c, cols - c);
}

/// weight/bias in the accumulation type, converted once per call (a [cols] copy for fp16/bf16).
template <typename T>
const acc_t<T>* as_acc(const T* p, int64_t cols, std::vector<acc_t<T>>& buf) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return p;
  } else {
    if (!p) return nullptr;
    buf.resize(cols);
    for (int64_t c = 0; c < cols; ++c) buf[c] = static_cast<acc_t<T>>(p[c]);
    return buf.data();
  }
}

template <typename T>
void forward_impl(const T* x, const T* weight_t, const T* bias_t, T* out, acc_t<T>* mean, acc_t<T>* rstd,
                  int64_t rows, int64_t cols, double eps) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  std::vector<A> wbuf, bbuf;
  const A* w = as_acc(weight_t, cols, wbuf);
  const A* b = as_acc(bias_t, cols, bbuf);
  const bool rms = mean == nullptr;
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * cols;
      T* outr = out + r * cols;
      A mu = 0, var;
      if (rms) {
        var = row_sum<A>(cols, [&](int64_t c, int64_t n) {
                const Vec v = load_n(xr + c, n);
                return v * v;
              }) / A(cols);
      } else {
        // Two passes over the cached row: the mean, then the mean of squared deviations (no
        // cancellation, unlike E[x^2] - E[x]^2).
        mu = row_sum<A>(cols, [&](int64_t c, int64_t n) { return load_n(xr + c, n); }) / A(cols);
        const Vec m(mu);
        var = row_sum<A>(cols, [&](int64_t c, int64_t n) {
                Vec d = load_n(xr + c, n) - m;
                if (n != S) d = Vec::set(Vec(A(0)), d, n);  // lanes past the row hold -mean
                return d * d;
              }) / A(cols);
      }
      const A rs = A(1) / std::sqrt(var + static_cast<A>(eps));
      if (mean) mean[r] = mu;
      rstd[r] = rs;
      const Vec m(mu), s(rs);
      row_for_each<S>(cols, [&](int64_t c, int64_t n) {
        const Vec wv = w ? load_n(w + c, n) : Vec(), bv = b ? load_n(b + c, n) : Vec();
        store_n(outr + c, norm::forward(load_n(xr + c, n), m, s, w != nullptr, wv, b != nullptr, bv), n);
      });
    }
  });
}

template <typename T>
void backward_impl(const T* grad, const T* x, const T* weight_t, const acc_t<T>* mean, const acc_t<T>* rstd,
                   T* grad_x, T* grad_weight, T* grad_bias, int64_t rows, int64_t cols) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  std::vector<A> wbuf;
  const A* w = as_acc(weight_t, cols, wbuf);
  // One row. With xhat = (x - mean) * rstd and g = grad * weight:
  //   grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMSNorm: no mean(g) term).
  // pw/pb, when given, accumulate grad * xhat and grad column by column (partial weight/bias grads).
  auto row_op = [&](int64_t r, A* pw, A* pb) {
    const T* gr = grad + r * cols;
    const T* xr = x + r * cols;
    T* gxr = grad_x + r * cols;
    const Vec m(mean ? mean[r] : A(0)), s(rstd[r]);
    const auto [sum_g, sum_gx] = row_sum2<A>(cols, [&](int64_t c, int64_t n) {
      // Lanes past the row: dy = 0, so g, g * xhat and the partial updates are 0 there.
      const Vec dy = load_n(gr + c, n);
      const Vec xh = norm::normalize(load_n(xr + c, n), m, s);
      if (pw) store_n(pw + c, load_n(pw + c, n) + dy * xh, n);
      if (pb) store_n(pb + c, load_n(pb + c, n) + dy, n);
      const Vec g = norm::grad_xhat(dy, w != nullptr, w ? load_n(w + c, n) : Vec());
      return std::pair{g, g * xh};
    });
    const Vec a(mean ? sum_g / A(cols) : A(0)), bcoef(sum_gx / A(cols));
    row_for_each<S>(cols, [&](int64_t c, int64_t n) {
      const Vec xh = norm::normalize(load_n(xr + c, n), m, s);
      const Vec g = norm::grad_xhat(load_n(gr + c, n), w != nullptr, w ? load_n(w + c, n) : Vec());
      store_n(gxr + c, norm::grad_x(g, xh, s, a, bcoef), n);
    });
  };
  if (!grad_weight && !grad_bias) {
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_op(r, nullptr, nullptr);
    });
    return;
  }
  column_sums_in_chunks<A, 2, T>(rows, cols, {grad_weight, grad_bias},
                                 [&](int64_t r0, int64_t r1, std::array<A*, 2> part) {
                                   for (int64_t r = r0; r < r1; ++r) row_op(r, part[0], part[1]);
                                 });
}

}  // namespace

void norm_forward(const kernels::NormForward& p) {
  if (p.rows == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    using A = acc_t<T>;
    forward_impl<T>(static_cast<const T*>(p.x), static_cast<const T*>(p.weight), static_cast<const T*>(p.bias),
                    static_cast<T*>(p.out), static_cast<A*>(p.mean), static_cast<A*>(p.rstd), p.rows, p.cols, p.eps);
  });
}

void norm_backward(const kernels::NormBackward& p) {
  if (p.rows == 0 || p.cols == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    using A = acc_t<T>;
    backward_impl<T>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.x), static_cast<const T*>(p.weight),
                     static_cast<const A*>(p.mean), static_cast<const A*>(p.rstd), static_cast<T*>(p.grad_x),
                     static_cast<T*>(p.grad_weight), static_cast<T*>(p.grad_bias), p.rows, p.cols);
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
