#pragma once
// \brief The apply_rotary_emb kernels (kernels/cpu/rotary.cpp, kernels/cuda/rotary.cu) and the rotation both
//        compute. x/out are contiguous [seq, inner, head_dim] of `dtype`; cos/sin are contiguous
//        [seq, rotary_dim] of the accumulation type (fp32, fp64 for fp64 x). Math in that type, one rounding
//        on store.
#include "kernels/common.h"

namespace megacore::kernels {

struct RotaryEmb {
  const void* x;    // forward: x; backward: grad_out
  const void* cos;  // [seq, rotary_dim]
  const void* sin;  // [seq, rotary_dim]
  void* out;        // forward: x * cos + rotate_half(x) * sin on the first rotary_dim features; backward: its
                    // transpose (grad_x from grad_out). Features past rotary_dim are copied.
  int64_t seq, inner, head_dim, rotary_dim;
  DType dtype;
  bool backward;
};

namespace rotary {

/// The rotate-half pairing: feature j < h = rotary_dim / 2 (x1, cos c1, sin s1) pairs with feature h + j
/// (x2, c2, s2).
///   forward:             o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2
///   backward (transpose): o1 = x1 c1 + x2 s2,  o2 = x2 c2 - x1 s1
template <bool Backward, typename V>
MEGACORE_HD void rotate(V x1, V x2, V c1, V c2, V s1, V s2, V& o1, V& o2) {
  if constexpr (Backward) {
    o1 = x1 * c1 + x2 * s2;
    o2 = x2 * c2 - x1 * s1;
  } else {
    o1 = x1 * c1 - x2 * s1;
    o2 = x2 * c2 + x1 * s2;
  }
}

}  // namespace rotary
}  // namespace megacore::kernels

MEGACORE_KERNEL(rotary_emb, RotaryEmb)
