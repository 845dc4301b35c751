// The activation kernels on CPU: one pass each, vectorized in the accumulation type, parallel over elements
// (forward, and backward without a bias gradient) or over row chunks with per-chunk bias partial sums
// (backward). The activations themselves are kernels/activation.h's, shared with the CUDA kernels.
#include "kernels/activation.h"

#include "kernels/cpu/vec.h"

/// MEGACORE_DISPATCH_ACTIVATION with an unknown activation an internal error.
#define MEGACORE_CPU_DISPATCH_ACTIVATION(activation, A, ...)                                                  \
  MEGACORE_DISPATCH_ACTIVATION(                                                                              \
      activation, A,                                                                                         \
      TORCH_INTERNAL_ASSERT(false, "megacore: unknown kernels::Activation ", static_cast<int>(activation)), \
      __VA_ARGS__)

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

using kernels::Activation;
namespace act = kernels::activation;

/// Loads p[0, n) as the accumulation type: a full vector when n == kStep<T>, else the tail.
template <typename T>
inline AccVec<T> load_n(const T* p, int64_t n) {
  return n == kStep<T> ? load_vec(p) : load_vec(p, n);
}

/// p[0, n) + bias[0, n), or p[0, n) without a bias.
template <typename T>
inline AccVec<T> load_biased(const T* p, const T* bias, int64_t n) {
  return bias ? load_n(p, n) + load_n(bias, n) : load_n(p, n);
}

/// Stores v[0, n) with one rounding.
template <typename T>
inline void store_n(T* p, const AccVec<T>& v, int64_t n) {
  if (n == kStep<T>) {
    store_vec(p, v);
  } else {
    store_vec(p, v, n);
  }
}

/// Adds v into the accumulator row `partial` at [0, n).
template <typename A>
inline void accumulate(A* partial, const Vectorized<A>& v, int64_t n) {
  (Vectorized<A>::loadu(partial, n) + v).store(partial, n);
}

/// Calls f(c, n) for the vectors [c, c + n) of the columns [c0, c1): full ones, then the tail.
template <typename T, typename F>
inline void for_each_vector(int64_t c0, int64_t c1, const F& f) {
  constexpr int64_t S = kStep<T>;
  int64_t c = c0;
  for (; c + S <= c1; c += S) f(c, S);
  if (c < c1) f(c, c1 - c);
}

/// Runs row_op(row, c0, c1, nullptr) over every element of [rows, cols] in parallel, or, with grad_bias,
/// row_op(row, 0, cols, partial) for each row in the fixed chunks of column_sums_in_chunks, whose column
/// sums of the partial rows go to grad_bias ([bias_cols] >= cols; row_op adds each row's gradient into
/// partial at the columns it gives them).
template <typename T, typename RowOp>
void over_rows(int64_t rows, int64_t cols, T* grad_bias, int64_t bias_cols, const RowOp& row_op) {
  using A = acc_t<T>;
  if (!grad_bias) {
    at::parallel_for(0, rows * cols, 32768, [&](int64_t begin, int64_t end) {
      for_each_row_segment(begin, end, cols, [&](int64_t r, int64_t c0, int64_t c1) { row_op(r, c0, c1, nullptr); });
    });
    return;
  }
  column_sums_in_chunks<A, 1, T>(rows, bias_cols, {grad_bias}, [&](int64_t r0, int64_t r1, std::array<A*, 1> part) {
    for (int64_t r = r0; r < r1; ++r) row_op(r, 0, cols, part[0]);
  });
}

// ---- bias + activation ---------------------------------------------------------------------------------

template <Activation Act, typename T>
void forward_impl(const T* x, const T* bias, T* out, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows * cols, 32768, [&](int64_t begin, int64_t end) {
    for_each_row_segment(begin, end, cols, [&](int64_t row, int64_t c0, int64_t c1) {
      const int64_t off = row * cols;
      for_each_vector<T>(c0, c1, [&](int64_t c, int64_t n) {
        store_n(out + off + c, act::forward<Act>(load_biased(x + off + c, bias ? bias + c : nullptr, n)), n);
      });
    });
  });
}

template <Activation Act, typename T>
void backward_impl(const T* grad_out, const T* x, const T* bias, T* grad_x, T* grad_bias, int64_t rows,
                   int64_t cols) {
  using A = acc_t<T>;
  // One row segment: grad_x = grad * act'(x + bias), added (before rounding) into `partial` if given.
  auto row_op = [&](int64_t row, int64_t c0, int64_t c1, A* partial) {
    const int64_t off = row * cols;
    for_each_vector<T>(c0, c1, [&](int64_t c, int64_t n) {
      const AccVec<T> v = load_biased(x + off + c, bias ? bias + c : nullptr, n);
      const AccVec<T> gx = load_n(grad_out + off + c, n) * act::grad<Act>(v);
      store_n(grad_x + off + c, gx, n);
      if (partial) accumulate(partial + c, gx, n);
    });
  };
  over_rows(rows, cols, grad_bias, cols, row_op);
}

// ---- gated linear units: x [rows, 2 cols] = [gate | linear] -> out [rows, cols] ------------------------

template <Activation Act, typename T>
void gated_forward_impl(const T* x, const T* bias, T* out, int64_t rows, int64_t cols) {
  at::parallel_for(0, rows * cols, 32768, [&](int64_t begin, int64_t end) {
    for_each_row_segment(begin, end, cols, [&](int64_t row, int64_t c0, int64_t c1) {
      const T* gate = x + row * 2 * cols;
      const T* linear = gate + cols;
      T* outr = out + row * cols;
      for_each_vector<T>(c0, c1, [&](int64_t c, int64_t n) {
        const AccVec<T> a = load_biased(gate + c, bias ? bias + c : nullptr, n);
        const AccVec<T> b = load_biased(linear + c, bias ? bias + cols + c : nullptr, n);
        store_n(outr + c, act::forward<Act>(a) * b, n);
      });
    });
  });
}

template <Activation Act, typename T>
void gated_backward_impl(const T* grad_out, const T* x, const T* bias, T* grad_x, T* grad_bias, int64_t rows,
                         int64_t cols) {
  using A = acc_t<T>;
  // One row segment of the output's columns [c0, c1): the gate's and the linear half's gradients at those
  // columns of each half, added (before rounding) into `partial` ([2 cols]) if given.
  auto row_op = [&](int64_t row, int64_t c0, int64_t c1, A* partial) {
    const T* gate = x + row * 2 * cols;
    const T* linear = gate + cols;
    const T* g = grad_out + row * cols;
    T* grad_gate = grad_x + row * 2 * cols;
    T* grad_linear = grad_gate + cols;
    for_each_vector<T>(c0, c1, [&](int64_t c, int64_t n) {
      const AccVec<T> a = load_biased(gate + c, bias ? bias + c : nullptr, n);
      const AccVec<T> b = load_biased(linear + c, bias ? bias + cols + c : nullptr, n);
      const AccVec<T> gv = load_n(g + c, n);
      const auto f = act::value_and_grad<Act>(a);
      const AccVec<T> ga = gv * b * f.grad, gb = gv * f.value;
      store_n(grad_gate + c, ga, n);
      store_n(grad_linear + c, gb, n);
      if (partial) {
        accumulate(partial + c, ga, n);
        accumulate(partial + cols + c, gb, n);
      }
    });
  };
  over_rows(rows, cols, grad_bias, 2 * cols, row_op);
}

}  // namespace

void bias_activation_forward(const kernels::BiasActivationForward& p) {
  if (p.rows == 0 || p.cols == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, MEGACORE_CPU_DISPATCH_ACTIVATION(p.activation, Act, {
    forward_impl<Act, T>(static_cast<const T*>(p.x), static_cast<const T*>(p.bias), static_cast<T*>(p.out), p.rows,
                         p.cols);
  }));
}

void bias_activation_backward(const kernels::BiasActivationBackward& p) {
  if (p.rows == 0 || p.cols == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, MEGACORE_CPU_DISPATCH_ACTIVATION(p.activation, Act, {
    backward_impl<Act, T>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.x),
                          static_cast<const T*>(p.bias), static_cast<T*>(p.grad_x), static_cast<T*>(p.grad_bias),
                          p.rows, p.cols);
  }));
}

void bias_gated_forward(const kernels::BiasGatedForward& p) {
  if (p.rows == 0 || p.cols == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, MEGACORE_CPU_DISPATCH_ACTIVATION(p.activation, Act, {
    gated_forward_impl<Act, T>(static_cast<const T*>(p.x), static_cast<const T*>(p.bias), static_cast<T*>(p.out),
                               p.rows, p.cols);
  }));
}

void bias_gated_backward(const kernels::BiasGatedBackward& p) {
  if (p.rows == 0 || p.cols == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, MEGACORE_CPU_DISPATCH_ACTIVATION(p.activation, Act, {
    gated_backward_impl<Act, T>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.x),
                                static_cast<const T*>(p.bias), static_cast<T*>(p.grad_x),
                                static_cast<T*>(p.grad_bias), p.rows, p.cols);
  }));
}

}  // namespace megacore::cpu::CPU_CAPABILITY
