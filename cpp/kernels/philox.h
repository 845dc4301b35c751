#pragma once
// \brief Philox-4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11), the
//        counter-based generator behind bias_dropout_add's keep mask. Torch-free: the same code runs in
//        the CPU kernels and in CUDA device code, so both draw the same mask for the same seed.
//
// The mask of element e (linear index in x's contiguous layout): key = the 64-bit seed as (low, high)
// 32-bit words, counter = (e / 4 as a 64-bit number in words 0-1, 0, 0), u = word e % 4 of the output;
// keep iff u >= keep_threshold(p). The mask depends on (seed, e) only, never on how work is split.
#include <cstdint>

#include "kernels/common.h"  // MEGACORE_HD

namespace megacore::philox {

constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;   // round multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key increments between rounds
constexpr int kRounds = 10;

/// \brief One Philox round on the counter words (c0..c3) with key (k0, k1), in place.
MEGACORE_HD void single_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

/// \brief The key of round i + 1 from that of round i.
MEGACORE_HD void bump_key(uint32_t& k0, uint32_t& k1) {
  k0 += kWeyl0;
  k1 += kWeyl1;
}

/// \brief The 4 output words of counter `ctr` (words 2 and 3 of the counter are 0) under `seed`.
MEGACORE_HD void philox4x32_10(uint64_t ctr, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int i = 0; i < kRounds; ++i) {
    if (i > 0) bump_key(k0, k1);
    single_round(c0, c1, c2, c3, k0, k1);
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

/// \brief Keep iff the element's word u >= this: ceil(p * 2^32), capped at 2^32 - 1 (p < 1), so
///        P(keep) = 1 - p up to 2^-32. p == 0 keeps everything.
inline uint32_t keep_threshold(double p) {
  double t = p * 4294967296.0;  // exact: scaling by a power of two
  const uint64_t f = static_cast<uint64_t>(t);
  const uint64_t c = static_cast<double>(f) < t ? f + 1 : f;
  return c > 0xFFFFFFFFull ? 0xFFFFFFFFu : static_cast<uint32_t>(c);
}

}  // namespace megacore::philox
