// bias_gelu forward/backward on CPU: one pass, vectorized in the accumulation type, parallel over
// elements (forward) or row chunks with per-chunk bias partial sums (backward). The GeLU itself is
// kernels/activation.h's, shared with the CUDA kernels.
#include "kernels/activation.h"

#include "kernels/cpu/vec.h"

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

using kernels::gelu::forward;
using kernels::gelu::grad;

template <typename T>
void forward_impl(const T* x, const T* bias, T* out, int64_t rows, int64_t cols, bool tanh) {
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  at::parallel_for(0, rows * cols, 32768, [&](int64_t begin, int64_t end) {
    for_each_row_segment(begin, end, cols, [&](int64_t row, int64_t c0, int64_t c1) {
      const T* xr = x + row * cols;
      T* outr = out + row * cols;
      int64_t c = c0;
      for (; c + S <= c1; c += S) {
        Vec v = load_vec(xr + c);
        if (bias) v = v + load_vec(bias + c);
        store_vec(outr + c, forward(v, tanh));
      }
      if (c < c1) {
        Vec v = load_vec(xr + c, c1 - c);
        if (bias) v = v + load_vec(bias + c, c1 - c);
        store_vec(outr + c, forward(v, tanh), c1 - c);
      }
    });
  });
}

template <typename T>
void backward_impl(const T* grad_out, const T* x, const T* bias, T* grad_x, T* grad_bias, int64_t rows,
                   int64_t cols, bool tanh) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  // One row of the result: grad_x = grad * gelu'(x + bias); if `partial` is given, grad_x (before
  // rounding) is added into it, column by column.
  auto row_op = [&](int64_t row, int64_t c0, int64_t c1, A* partial) {
    const int64_t off = row * cols;
    int64_t c = c0;
    for (; c + S <= c1; c += S) {
      Vec v = load_vec(x + off + c);
      if (bias) v = v + load_vec(bias + c);
      const Vec gx = load_vec(grad_out + off + c) * grad(v, tanh);
      store_vec(grad_x + off + c, gx);
      if (partial) (Vec::loadu(partial + c) + gx).store(partial + c);
    }
    if (c < c1) {
      const int64_t n = c1 - c;
      Vec v = load_vec(x + off + c, n);
      if (bias) v = v + load_vec(bias + c, n);
      const Vec gx = load_vec(grad_out + off + c, n) * grad(v, tanh);
      store_vec(grad_x + off + c, gx, n);
      if (partial) (Vec::loadu(partial + c, n) + gx).store(partial + c, n);
    }
  };
  if (!grad_bias) {
    at::parallel_for(0, rows * cols, 32768, [&](int64_t begin, int64_t end) {
      for_each_row_segment(begin, end, cols, [&](int64_t r, int64_t c0, int64_t c1) { row_op(r, c0, c1, nullptr); });
    });
    return;
  }
  column_sums_in_chunks<A, 1, T>(rows, cols, {grad_bias}, [&](int64_t r0, int64_t r1, std::array<A*, 1> part) {
    for (int64_t r = r0; r < r1; ++r) row_op(r, 0, cols, part[0]);
  });
}

}  // namespace

void bias_gelu_forward(const kernels::BiasGeluForward& p) {
  if (p.rows == 0 || p.cols == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    forward_impl<T>(static_cast<const T*>(p.x), static_cast<const T*>(p.bias), static_cast<T*>(p.out), p.rows,
                    p.cols, p.tanh);
  });
}

void bias_gelu_backward(const kernels::BiasGeluBackward& p) {
  if (p.rows == 0 || p.cols == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    backward_impl<T>(static_cast<const T*>(p.grad_out), static_cast<const T*>(p.x), static_cast<const T*>(p.bias),
                     static_cast<T*>(p.grad_x), static_cast<T*>(p.grad_bias), p.rows, p.cols, p.tanh);
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
