// bias_dropout_add forward/backward on CPU. The keep mask is made tile by tile: Philox-4x32-10 run on
// kLanes counters side by side (AVX2/AVX512 intrinsics; plain loops over lanes for the DEFAULT build), turned into a tile of
// multipliers (0 or 1 / (1 - p)) in the accumulation type, which the elementwise pass then reads as vectors.
// The mask of element e depends on (seed, e) only, so any split of the work gives the same result; the keep
// decision and the multiplier are kernels/dropout.h's, shared with the CUDA kernels.
#include "kernels/dropout.h"

#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "kernels/cpu/vec.h"
#include "kernels/philox.h"  // shared with the CUDA kernels

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kLanes = 64;   // Philox counters computed side by side (4 AVX512 vectors of uint32)
constexpr int64_t kTile = 1024;  // elements per mask tile (a multiple of 4)

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Philox on vectors of uint32 lanes. x86 has no 32-bit mulhi, so each multiply is done as two widening
// 32x32->64 multiplies (even lanes, odd lanes) recombined into the low and high words.
#if defined(CPU_CAPABILITY_AVX512)
using VecU = __m512i;
constexpr int64_t kVecLanes = 16;
inline VecU set1(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
inline VecU load(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline void store(uint32_t* p, VecU v) { _mm512_storeu_si512(p, v); }
inline VecU xor3(VecU a, VecU b, VecU c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
inline void mulhilo(VecU a, VecU m, VecU& hi, VecU& lo) {
  const VecU even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
#else
using VecU = __m256i;
constexpr int64_t kVecLanes = 8;
inline VecU set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline VecU load(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void store(uint32_t* p, VecU v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline VecU xor3(VecU a, VecU b, VecU c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
inline void mulhilo(VecU a, VecU m, VecU& hi, VecU& lo) {
  const VecU even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif

/// w[j][l] = word j of Philox(counter q0 + l), l < kLanes: the rounds of kernels/philox.h on vectors. Several
/// independent vectors go through each round together: one alone would wait on the multiply latency.
inline void philox_lanes(uint64_t q0, uint64_t seed, uint32_t (&w)[4][kLanes]) {
  constexpr int64_t N = kLanes / kVecLanes;
  static_assert(kLanes % kVecLanes == 0);
  uint32_t lo[kLanes], hi[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    lo[l] = static_cast<uint32_t>(q0 + l);
    hi[l] = static_cast<uint32_t>((q0 + l) >> 32);
  }
  VecU c0[N], c1[N], c2[N], c3[N];
  for (int64_t n = 0; n < N; ++n) {
    c0[n] = load(lo + n * kVecLanes);
    c1[n] = load(hi + n * kVecLanes);
    c2[n] = c3[n] = set1(0);
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const VecU m0 = set1(philox::kMul0), m1 = set1(philox::kMul1);
  for (int i = 0; i < philox::kRounds; ++i) {
    if (i > 0) philox::bump_key(k0, k1);
    const VecU vk0 = set1(k0), vk1 = set1(k1);
    for (int64_t n = 0; n < N; ++n) {
      VecU hi0, lo0, hi1, lo1;
      mulhilo(c0[n], m0, hi0, lo0);
      mulhilo(c2[n], m1, hi1, lo1);
      c0[n] = xor3(hi1, c1[n], vk0);
      c2[n] = xor3(hi0, c3[n], vk1);
      c1[n] = lo1;
      c3[n] = lo0;
    }
  }
  for (int64_t n = 0; n < N; ++n) {
    store(w[0] + n * kVecLanes, c0[n]);
    store(w[1] + n * kVecLanes, c1[n]);
    store(w[2] + n * kVecLanes, c2[n]);
    store(w[3] + n * kVecLanes, c3[n]);
  }
}
#else
/// w[j][l] = word j of Philox(counter q0 + l), l < kLanes (the compiler vectorizes across lanes).
inline void philox_lanes(uint64_t q0, uint64_t seed, uint32_t (&w)[4][kLanes]) {
  for (int64_t l = 0; l < kLanes; ++l) {
    uint32_t o[4];
    philox::philox4x32_10(q0 + static_cast<uint64_t>(l), seed, o);
    for (int j = 0; j < 4; ++j) w[j][l] = o[j];
  }
}
#endif

template <typename A>
struct Mask {
  uint64_t seed;
  uint32_t threshold;  // keep iff word >= threshold
  A scale;             // 1 / (1 - p)
};

/// m[i] = scale if element 4 * q0 + i is kept, else 0, for the 4 * nq elements of counters [q0, q0 + nq);
/// nq is a multiple of kLanes.
template <typename A>
void mask_tile(const Mask<A>& mask, uint64_t q0, int64_t nq, A* m) {
  for (int64_t b = 0; b < nq; b += kLanes) {
    uint32_t w[4][kLanes];
    philox_lanes(q0 + static_cast<uint64_t>(b), mask.seed, w);
    // Word j of counter q is element 4 * q + j (kernels::dropout::counter_of, word_of).
    A* mb = m + 4 * b;
    const uint32_t t = mask.threshold;
    for (int64_t l = 0; l < kLanes; ++l) {
      for (int j = 0; j < 4; ++j) mb[4 * l + j] = kernels::dropout::multiplier(w[j][l], t, mask.scale);
    }
  }
}

/// Calls f(a, b, m) over consecutive tiles [a, b) of the element range [begin, end), where m[e - a] is the
/// multiplier of element e.
template <typename A, typename F>
void for_each_mask_tile(const Mask<A>& mask, int64_t begin, int64_t end, const F& f) {
  // A tile of kTile elements starting mid-counter spans up to kTile / 4 + 1 counters, rounded up to kLanes.
  alignas(64) A m[kTile + 4 * kLanes];
  for (int64_t a = begin; a < end; a += kTile) {
    const int64_t b = std::min(end, a + kTile);
    const int64_t q0 = static_cast<int64_t>(kernels::dropout::counter_of(a)), q1 = (b + 3) / 4;
    const int64_t nq = (q1 - q0 + kLanes - 1) / kLanes * kLanes;
    mask_tile(mask, static_cast<uint64_t>(q0), nq, m);
    f(a, b, m + kernels::dropout::word_of(a));  // element a is word word_of(a) of counter q0
  }
}

template <typename T, bool Drop>
void forward_impl(const T* x, const T* bias, const T* res, T* out, int64_t rows, int64_t cols,
                  const Mask<acc_t<T>>& mask) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  // out = res + (x + bias) * m over [a, b), m indexed from a (null without dropout).
  auto apply = [&](int64_t a, int64_t b, const A* m) {
    for_each_row_segment(a, b, cols, [&](int64_t row, int64_t c0, int64_t c1) {
      const int64_t off = row * cols;
      const A* mr = Drop ? m + (off - a) : nullptr;
      int64_t c = c0;
      for (; c + S <= c1; c += S) {
        Vec v = load_vec(x + off + c);
        if (bias) v = v + load_vec(bias + c);
        if constexpr (Drop) v = v * Vec::loadu(mr + c);
        store_vec(out + off + c, load_vec(res + off + c) + v);
      }
      if (c < c1) {
        const int64_t n = c1 - c;
        Vec v = load_vec(x + off + c, n);
        if (bias) v = v + load_vec(bias + c, n);
        if constexpr (Drop) v = v * Vec::loadu(mr + c, n);
        store_vec(out + off + c, load_vec(res + off + c, n) + v, n);
      }
    });
  };
  at::parallel_for(0, rows * cols, 32768, [&](int64_t begin, int64_t end) {
    if constexpr (Drop) {
      for_each_mask_tile(mask, begin, end, apply);
    } else {
      apply(begin, end, nullptr);
    }
  });
}

template <typename T, bool Drop>
void backward_impl(const T* grad, T* grad_x, T* grad_bias, int64_t rows, int64_t cols,
                   const Mask<acc_t<T>>& mask) {
  using A = acc_t<T>;
  using Vec = AccVec<T>;
  constexpr int64_t S = kStep<T>;
  // grad_x = grad * m over [a, b), m indexed from a; with `partial`, grad_x (before rounding) is added into
  // it column by column.
  auto apply = [&](int64_t a, int64_t b, const A* m, A* partial) {
    for_each_row_segment(a, b, cols, [&](int64_t row, int64_t c0, int64_t c1) {
      const int64_t off = row * cols;
      const A* mr = Drop ? m + (off - a) : nullptr;
      int64_t c = c0;
      for (; c + S <= c1; c += S) {
        Vec gx = load_vec(grad + off + c);
        if constexpr (Drop) gx = gx * Vec::loadu(mr + c);
        store_vec(grad_x + off + c, gx);
        if (partial) (Vec::loadu(partial + c) + gx).store(partial + c);
      }
      if (c < c1) {
        const int64_t n = c1 - c;
        Vec gx = load_vec(grad + off + c, n);
        if constexpr (Drop) gx = gx * Vec::loadu(mr + c, n);
        store_vec(grad_x + off + c, gx, n);
        if (partial) (Vec::loadu(partial + c, n) + gx).store(partial + c, n);
      }
    });
  };
  auto range = [&](int64_t begin, int64_t end, A* partial) {
    if constexpr (Drop) {
      for_each_mask_tile(mask, begin, end, [&](int64_t a, int64_t b, const A* m) { apply(a, b, m, partial); });
    } else {
      apply(begin, end, nullptr, partial);
    }
  };
  if (!grad_bias) {
    at::parallel_for(0, rows * cols, 32768, [&](int64_t begin, int64_t end) { range(begin, end, nullptr); });
    return;
  }
  column_sums_in_chunks<A, 1, T>(rows, cols, {grad_bias}, [&](int64_t r0, int64_t r1, std::array<A*, 1> part) {
    range(r0 * cols, r1 * cols, part[0]);
  });
}

template <typename A>
Mask<A> make_mask(double p, int64_t seed) {
  return {static_cast<uint64_t>(seed), kernels::dropout::threshold(p), kernels::dropout::scale<A>(p)};
}

}  // namespace

void bias_dropout_add_forward(const kernels::BiasDropoutAddForward& p) {
  if (p.rows == 0 || p.cols == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    const auto mask = make_mask<acc_t<T>>(p.p, p.seed);
    auto run = [&](auto drop) {
      forward_impl<T, decltype(drop)::value>(static_cast<const T*>(p.x), static_cast<const T*>(p.bias),
                                             static_cast<const T*>(p.residual), static_cast<T*>(p.out), p.rows,
                                             p.cols, mask);
    };
    if (p.p > 0) run(std::true_type{}); else run(std::false_type{});
  });
}

void bias_dropout_add_backward(const kernels::BiasDropoutAddBackward& p) {
  if (p.rows == 0 || p.cols == 0) return;
  MEGACORE_CPU_DISPATCH(p.dtype, T, {
    const auto mask = make_mask<acc_t<T>>(p.p, p.seed);
    auto run = [&](auto drop) {
      backward_impl<T, decltype(drop)::value>(static_cast<const T*>(p.grad_out), static_cast<T*>(p.grad_x),
                                              static_cast<T*>(p.grad_bias), p.rows, p.cols, mask);
    };
    if (p.p > 0) run(std::true_type{}); else run(std::false_type{});
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
