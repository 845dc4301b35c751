// apply_rotary_emb forward/backward on CPU: one pass over x, parallel over (seq, inner) rows, each row's two
// rotary halves read as vectors of the accumulation type; the features past rotary_dim are copied.
#include "cpu/rotary.h"

#include <ATen/Dispatch.h>

#include <cstring>

#include "cpu/vec.h"

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

// Forward, halves 1 = [:h], 2 = [h:r]:  o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2.
// Backward (the transpose):             o1 = x1 c1 + x2 s2,  o2 = x2 c2 - x1 s1.
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
    if constexpr (Backward) {
      o1 = x1 * c1 + x2 * s2;
      o2 = x2 * c2 - x1 * s1;
    } else {
      o1 = x1 * c1 - x2 * s1;
      o2 = x2 * c2 + x1 * s2;
    }
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

void rotary_emb(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& out,
                bool backward) {
  // x [seq, ..., d] -> [seq, inner, d]
  const int64_t seq = x.size(0), d = x.size(-1), r = cos.size(1);
  const int64_t inner = seq * d == 0 ? 0 : x.numel() / (seq * d);
  if (seq == 0 || inner == 0 || d == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "megacore.apply_rotary_emb", [&] {
    using A = acc_t<scalar_t>;
    auto run = [&](auto bwd) {
      rotary_impl<scalar_t, decltype(bwd)::value>(x.const_data_ptr<scalar_t>(), cos.const_data_ptr<A>(),
                                                  sin.const_data_ptr<A>(), out.mutable_data_ptr<scalar_t>(), seq,
                                                  inner, d, r);
    };
    if (backward) run(std::true_type{}); else run(std::false_type{});
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
