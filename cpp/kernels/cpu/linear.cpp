// The skinny-linear CPU kernel: y = x @ w^T (+ bias) for 1 to 16 rows of x (kernels/linear.h says why).
//
// The weight is read once, in blocks of OB consecutive rows: each block is dotted with a chunk of R rows of x,
// R * OB accumulators held in vector registers (OB weight loads and R activation loads per R * OB fused
// multiply-adds), the accumulators summed across lanes at the end. With more rows than R, the next chunk
// reads the same OB weight rows again from L1. While a block is computed, the rows PF blocks ahead are
// prefetched: at these sizes the hardware prefetcher alone leaves the core waiting on memory (on a 2-core
// Xeon, R = 8: 13 GB/s without, 17-21 GB/s with, against 7-10 GB/s for ATen; docs/benchmarks.md).
#include "kernels/linear.h"

#include "kernels/cpu/vec.h"

namespace megacore::cpu::CPU_CAPABILITY {
namespace {

using Vec = Vectorized<float>;
constexpr int64_t S = Vec::size();

// Register budget: 32 vector registers with AVX512, 16 otherwise. kRows is the row chunk; kBlock(r) the weight
// rows per block for a chunk of r rows (r * kBlock accumulators + kBlock weights + one activation).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRows = 8;
constexpr int block_rows(int r) { return r <= 2 ? 8 : (r <= 4 ? 4 : 3); }
#else
constexpr int kRows = 4;
constexpr int block_rows(int r) { return r <= 2 ? 4 : 2; }
#endif
constexpr int kPrefetchBlocks = 2;  // how far ahead the weight rows are prefetched, in blocks

// One block: weight rows w_rows[0..OB) (rows past `valid` repeat row 0 and are not stored) against R rows of x.
template <typename T, int R, int OB>
inline void block(const float* x, int64_t in, const T* const* w_rows, const T* const* prefetch, int valid,
                  const T* bias, int64_t o0, T* y, int64_t out) {
  Vec acc[R][OB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < OB; ++j) acc[r][j] = Vec(0.f);
  int64_t i = 0;
  for (; i + S <= in; i += S) {
    Vec wv[OB];
    for (int j = 0; j < OB; ++j) {
      wv[j] = load_vec(w_rows[j] + i);
      __builtin_prefetch(prefetch[j] + i, 0, 3);
    }
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x + r * in + i);
      for (int j = 0; j < OB; ++j) acc[r][j] = at::vec::fmadd(xv, wv[j], acc[r][j]);
    }
  }
  if (i < in) {
    const int64_t n = in - i;
    Vec wv[OB];
    for (int j = 0; j < OB; ++j) wv[j] = load_vec(w_rows[j] + i, n);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x + r * in + i, n);
      for (int j = 0; j < OB; ++j) acc[r][j] = at::vec::fmadd(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < valid; ++j) {
      float v = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, acc[r][j]);
      if (bias != nullptr) v += static_cast<float>(bias[o0 + j]);
      y[r * out + o0 + j] = static_cast<T>(v);
    }
  }
}

// Rows [r0, r0 + R) of x against weight rows [o0, o0 + valid).
template <typename T, int OB>
using BlockFn = void (*)(const float*, int64_t, const T* const*, const T* const*, int, const T*, int64_t, T*,
                         int64_t);

template <typename T, int OB, int... Rs>
constexpr std::array<BlockFn<T, OB>, sizeof...(Rs)> block_table(std::integer_sequence<int, Rs...>) {
  return {&block<T, Rs + 1, OB>...};
}

template <typename T, int OB>
void skinny(const kernels::SkinnyLinear& p) {
  static constexpr auto table = block_table<T, OB>(std::make_integer_sequence<int, kRows>{});
  const T* w = static_cast<const T*>(p.w);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t blocks = (p.out + OB - 1) / OB;
  // A block is OB * in weight elements; ~32K elements per task before a second thread pays off.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(OB * p.in, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = b * OB;
      const int valid = static_cast<int>(std::min<int64_t>(OB, p.out - o0));
      const T* rows[OB];
      const T* ahead[OB];
      for (int j = 0; j < OB; ++j) {
        rows[j] = w + (o0 + (j < valid ? j : 0)) * p.in;
        ahead[j] = w + std::min(o0 + kPrefetchBlocks * OB + j, p.out - 1) * p.in;
      }
      for (int64_t r0 = 0; r0 < p.rows; r0 += kRows) {
        const int64_t r = std::min<int64_t>(kRows, p.rows - r0);
        table[r - 1](p.x + r0 * p.in, p.in, rows, ahead, valid, bias, o0, y + r0 * p.out, p.out);
      }
    }
  });
}

template <typename T>
void skinny_dispatch(const kernels::SkinnyLinear& p) {
  // The block height is set by the first (largest) chunk of rows; a smaller last chunk fits the same registers.
  switch (block_rows(static_cast<int>(std::min<int64_t>(p.rows, kRows)))) {
    case 8: return skinny<T, 8>(p);
    case 4: return skinny<T, 4>(p);
    case 3: return skinny<T, 3>(p);
    case 2: return skinny<T, 2>(p);
    default: TORCH_INTERNAL_ASSERT(false, "megacore: skinny_linear has no block height for ", p.rows, " rows");
  }
}

}  // namespace

void skinny_linear(const kernels::SkinnyLinear& p) {
  TORCH_INTERNAL_ASSERT(p.rows >= 1 && p.rows <= kernels::kSkinnyLinearMaxRows, "megacore: skinny_linear: rows ",
                        p.rows);
  if (p.out == 0) return;
  switch (p.dtype) {
    case kernels::DType::kFloat32: return skinny_dispatch<float>(p);
    case kernels::DType::kBFloat16: return skinny_dispatch<c10::BFloat16>(p);
    case kernels::DType::kFloat16: return skinny_dispatch<c10::Half>(p);
    default: TORCH_INTERNAL_ASSERT(false, "megacore: skinny_linear takes fp32, bf16 or fp16");
  }
}

}  // namespace megacore::cpu::CPU_CAPABILITY
