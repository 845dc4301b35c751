#pragma once
// \brief Helpers for the per-ISA CPU kernels (cpp/kernels/cpu/*.cpp): the dtype dispatch of a kernel's
//        Params, load any float dtype as vectors of its accumulation type (fp32, or fp64 for fp64), store
//        back with one rounding, split work; and Math<Vectorized<A>> for the shared element-wise math.
//
// Only included from files compiled once per ISA; everything here lives in namespace
// megacore::cpu::CPU_CAPABILITY so the AVX512 and DEFAULT copies never meet at link time.
#ifndef CPU_CAPABILITY
#error "kernels/cpu/vec.h is for files in cpp/kernels/cpu/, which CMake compiles once per ISA"
#endif

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels/common.h"

namespace megacore::kernels {

/// \brief The shared element-wise math (kernels/<family>.h) on vectors of the accumulation type.
template <typename A>
struct Math<at::vec::Vectorized<A>> {
  using Scalar = A;
  using V = at::vec::Vectorized<A>;
  static V exp(const V& x) { return x.exp(); }
  static V fast_exp(const V& x) { return x.exp_u20(); }  // exact for double
  static V erf(const V& x) { return x.erf(); }
  static V log(const V& x) { return x.log(); }
  static V relu(const V& x) { return V::blendv(x, V(A(0)), x < V(A(0))); }
  static V relu_grad(const V& x) { return V(A(1)) - x.le(V(A(0))); }  // le: 1 where x <= 0, else 0 (NaN too)
};

}  // namespace megacore::kernels

/// Runs the statement list with `T` bound to the C++ type of a kernels::DType (c10::Half and
/// c10::BFloat16 for the 16-bit types); an unknown dtype is an internal error.
#define MEGACORE_CPU_DISPATCH(dtype, T, ...)                                                        \
  MEGACORE_DISPATCH_DTYPE(                                                                          \
      dtype, T, c10::Half, c10::BFloat16,                                                           \
      TORCH_INTERNAL_ASSERT(false, "megacore: unknown kernels::DType ", static_cast<int>(dtype)), \
      __VA_ARGS__)

namespace megacore::cpu::CPU_CAPABILITY {

using kernels::Math;
using kernels::splat;

using at::vec::Vectorized;

template <typename T>
using acc_t = at::opmath_type<T>;  // float for fp32/fp16/bf16, double for fp64
template <typename T>
using AccVec = Vectorized<acc_t<T>>;
template <typename T>
inline constexpr int64_t kStep = AccVec<T>::size();  // elements per vector of the accumulation type

template <typename T>
inline constexpr bool kReduced = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

/// Loads kStep<T> elements as the accumulation type.
template <typename T>
inline AccVec<T> load_vec(const T* p) {
  if constexpr (kReduced<T>) {
    Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  } else {
    return AccVec<T>::loadu(p);
  }
}

/// Loads n < kStep<T> elements; the rest of the vector is 0.
template <typename T>
inline AccVec<T> load_vec(const T* p, int64_t n) {
  if constexpr (kReduced<T>) {
    alignas(64) float tmp[kStep<T>] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vectorized<float>::loadu(tmp);
  } else {
    return AccVec<T>::loadu(p, n);
  }
}

/// Stores kStep<T> elements, rounding once from the accumulation type.
template <typename T>
inline void store_vec(T* p, const AccVec<T>& v) {
  if constexpr (kReduced<T>) {
    at::vec::convert_from_float<T>(v, v).store(p, kStep<T>);
  } else {
    v.store(p);
  }
}

/// Stores the first n < kStep<T> elements.
template <typename T>
inline void store_vec(T* p, const AccVec<T>& v, int64_t n) {
  if constexpr (kReduced<T>) {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  } else {
    v.store(p, n);
  }
}

/// Elements a row reduction adds in the vector lanes of its accumulation type before handing the partial
/// sum to a double. An fp32 lane stops growing at 2^24 when it adds values near 1 (x + 1 == x), so a
/// row of 2^31 elements summed in lanes alone comes out several times too small; blocks of 2^16 keep
/// every lane far below that. Rows of at most kSumBlock elements sum exactly as without blocks.
inline constexpr int64_t kSumBlock = int64_t(1) << 16;

/// sum_block(b0, b1) over the blocks [b0, b1) of [0, n) (kSumBlock long; block starts are multiples of
/// kSumBlock, so of every vector width), the blocks' results added in double. sum_block returns one
/// value of the accumulation type A or a std::pair of them; sum_in_blocks returns the same type.
template <typename F>
inline auto sum_in_blocks(int64_t n, const F& sum_block) {
  using R = decltype(sum_block(int64_t(0), int64_t(0)));
  if (n <= kSumBlock) return sum_block(int64_t(0), n);
  double first = 0, second = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const R r = sum_block(b0, std::min(n, b0 + kSumBlock));
    if constexpr (std::is_arithmetic_v<R>) {
      first += r;
    } else {
      first += r.first;
      second += r.second;
    }
  }
  if constexpr (std::is_arithmetic_v<R>) {
    return static_cast<R>(first);
  } else {
    return R(first, second);
  }
}

/// Grain for at::parallel_for over rows so that each task touches at least ~32k elements: smaller
/// tasks cost more in scheduling than they save.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

/// Runs f(row, col_begin, col_end) over the element range [begin, end) of a [rows, cols] matrix,
/// one call per row segment. Lets an elementwise kernel over a row-broadcast operand (a bias)
/// parallelize over elements even when there are few rows.
template <typename F>
inline void for_each_row_segment(int64_t begin, int64_t end, int64_t cols, const F& f) {
  int64_t row = begin / cols, col = begin % cols;
  while (begin < end) {
    const int64_t stop = std::min(end - begin, cols - col);
    f(row, col, col + stop);
    begin += stop;
    ++row;
    col = 0;
  }
}

/// Column sums of a [rows, cols] matrix that is produced row by row (bias and weight gradients),
/// bit-reproducible: rows are cut into a fixed number of chunks, independent of the thread count;
/// chunk_fn(r0, r1, parts) handles rows [r0, r1) and adds each row into parts[i] (a zeroed row of
/// `cols` values, null where outs[i] is null); the chunks' rows are then added in chunk order into
/// outs[i]. With rows == 0 the outputs are zeros. There are 64 chunks, or more when a chunk would add
/// more than kSumBlock rows into one value.
///
/// The outputs are of type O: A itself, or a dtype whose accumulation type is A (x's dtype for a
/// parameter gradient), rounded once from the sums.
template <typename A, size_t N, typename O, typename F>
inline void column_sums_in_chunks(int64_t rows, int64_t cols, const std::array<O*, N>& outs, const F& chunk_fn) {
  static_assert(std::is_same_v<acc_t<O>, A>, "column sums accumulate in the output's accumulation type");
  constexpr int64_t kChunks = 64;
  const int64_t wanted = std::max<int64_t>(kChunks, (rows + kSumBlock - 1) / kSumBlock);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, wanted));
  std::vector<A> partial(chunks * N * cols, A(0));  // [chunks, N, cols]
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      std::array<A*, N> parts;
      for (size_t i = 0; i < N; ++i) parts[i] = outs[i] ? partial.data() + (k * N + i) * cols : nullptr;
      chunk_fn(rows * k / chunks, rows * (k + 1) / chunks, parts);
    }
  });
  using Vec = Vectorized<A>;
  at::parallel_for(0, cols, 1024, [&](int64_t c0, int64_t c1) {
    for (size_t i = 0; i < N; ++i) {
      if (!outs[i]) continue;
      for (int64_t c = c0; c < c1; c += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), c1 - c);
        Vec acc(A(0));
        for (int64_t k = 0; k < chunks; ++k) acc = acc + Vec::loadu(partial.data() + (k * N + i) * cols + c, n);
        store_vec(outs[i] + c, acc, n);
      }
    }
  });
}

}  // namespace megacore::cpu::CPU_CAPABILITY
