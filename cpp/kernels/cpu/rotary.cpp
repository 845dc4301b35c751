// apply_rotary_emb forward/backward on CPU: one pass over x, parallel over (seq, inner) rows, each row's two
// rotary halves read as vectors of the accumulation type; the features past rotary_dim are copied. The
// rotation itself is kernels/rotary.h's, shared with the CUDA kernel.
#include "kernels/rotary.h"

#include <cstring>
#include <type_traits>

#include "kernels/cpu/vec.h"

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

// Halves 1 = [:h], 2 = [h:r] of each row, rotated pairwise by kernels::rotary::rotate.
template <typename T, bool Backward>
void rotary_impl(const T* x, const acc_t<T>* cos, const acc_t<T>* sin, T* out, int64_t seq, int64_t inner,
                 int64_t d, int64_t r) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  const int64_t h = r / 2;
  auto pair = [&](const T* xr, T* outr, const A* c, const A* s, int64_t k, int64_t n) {
    const bool full = n == S;
    const Vec x1 = full ? load_vec(xr + k) : load_vec(xr + k, n);
    const Vec x2 = full ? load_vec(xr + h + k) : load_vec(xr + h + k, n);
    const Vec c1 = full ? Vec::loadu(c + k) : Vec::loadu(c + k, n);
    const Vec c2 = full ? Vec::loadu(c + h + k) : Vec::loadu(c + h + k, n);
    const Vec s1 = full ? Vec::loadu(s + k) : Vec::loadu(s + k, n);
    const Vec s2 = full ? Vec::loadu(s + h + k) : Vec::loadu(s + h + k, n);
    Vec o1, o2;
    kernels::rotary::rotate<Backward>(x1, x2, c1, c2, s1, s2, o1, o2);
    if (full) {
      store_vec(outr + k, o1);
      store_vec(outr + h + k, o2);
    } else {
      store_vec(outr + k, o1, n);
      store_vec(outr + h + k, o2, n);
    }
  };
  at::parallel_for(0, seq * inner, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t pos = row / inner;
      const A* c = cos + pos * r;
      const A* s = sin + pos * r;
      const T* xr = x + row * d;
      T* outr = out + row * d;
      int64_t k = 0;
      for (; k + S <= h; k += S) pair(xr, outr, c, s, k, S);
      if (k < h) pair(xr, outr, c, s, k, h - k);
      if (r < d) std::memcpy(outr + r, xr + r, (d - r) * sizeof(T));
    }
  });
}

}  // namespace

void rotary_emb(const kernels::RotaryEmb& p) {
  if (p.seq == 0 || p.inner == 0 || p.head_dim == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    using A = acc_t<T>;
    auto run = [&](auto bwd) {
      rotary_impl<T, decltype(bwd)::value>(static_cast<const T*>(p.x), static_cast<const A*>(p.cos),
                                           static_cast<const A*>(p.sin), static_cast<T*>(p.out), p.seq, p.inner,
                                           p.head_dim, p.rotary_dim);
    };
    if (p.backward) run(std::true_type{}); else run(std::false_type{});
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
