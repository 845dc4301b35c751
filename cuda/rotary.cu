// apply_rotary_emb on CUDA: a block covers blockDim.y rows of [seq * inner, head_dim]; within a row, thread
// j < rotary_dim / 2 rotates the pair (j, j + rotary_dim / 2) and the others copy the pass-through features.
#include <algorithm>

#include "common.cuh"
#include "rotary.h"

namespace megacore::cuda {
namespace {

// Forward, halves 1 = [:h], 2 = [h:r]:  o1 = x1 c1 - x2 s1,  o2 = x2 c2 + x1 s2.
// Backward (the transpose):             o1 = x1 c1 + x2 s2,  o2 = x2 c2 - x1 s1.
template <typename T, bool Backward>
__global__ void rotary_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ cos,
                              const acc_t<T>* __restrict__ sin, T* __restrict__ out, int64_t rows, int64_t inner,
                              int64_t d, int64_t r) {
  using A = acc_t<T>;
  const int64_t h = r / 2, work = h + (d - r);  // per row: h pairs, then d - r copies
  for (int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const T* xr = x + row * d;
    T* outr = out + row * d;
    const A* c = cos + (row / inner) * r;
    const A* s = sin + (row / inner) * r;
    for (int64_t j = threadIdx.x; j < work; j += blockDim.x) {
      if (j < h) {
        const A x1 = to_acc(xr[j]), x2 = to_acc(xr[h + j]);
        const A c1 = c[j], c2 = c[h + j], s1 = s[j], s2 = s[h + j];
        A o1, o2;
        if constexpr (Backward) {
          o1 = x1 * c1 + x2 * s2;
          o2 = x2 * c2 - x1 * s1;
        } else {
          o1 = x1 * c1 - x2 * s1;
          o2 = x2 * c2 + x1 * s2;
        }
        outr[j] = from_acc<T>(o1);
        outr[h + j] = from_acc<T>(o2);
      } else {
        const int64_t k = r + (j - h);
        outr[k] = xr[k];
      }
    }
  }
}

}  // namespace

cudaError_t apply_rotary_emb(const void* x, const void* cos, const void* sin, void* out, int64_t seq, int64_t inner,
                             int64_t head_dim, int64_t rotary_dim, DType dtype, bool backward, cudaStream_t stream) {
  NvtxRange range(backward ? "megacore.apply_rotary_emb_backward" : "megacore.apply_rotary_emb");
  const int64_t rows = seq * inner;
  if (rows == 0 || head_dim == 0) return cudaSuccess;
  // Threads along a row: the per-row work rounded up to a warp, at most 256; the rest of the block's 256
  // threads take further rows.
  const int64_t work = rotary_dim / 2 + (head_dim - rotary_dim);
  const int tx = static_cast<int>(std::min<int64_t>(256, (work + 31) / 32 * 32));
  const dim3 block(tx, 256 / tx);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((rows + block.y - 1) / block.y, 65535LL * 16));
  MEGACORE_DISPATCH_FLOAT(dtype, T, {
    using A = acc_t<T>;
    const T* xp = static_cast<const T*>(x);
    const A* cp = static_cast<const A*>(cos);
    const A* sp = static_cast<const A*>(sin);
    T* op = static_cast<T*>(out);
    if (backward) rotary_kernel<T, true><<<blocks, block, 0, stream>>>(xp, cp, sp, op, rows, inner, head_dim, rotary_dim);
    else rotary_kernel<T, false><<<blocks, block, 0, stream>>>(xp, cp, sp, op, rows, inner, head_dim, rotary_dim);
    return cudaGetLastError();
  });
  return cudaSuccess;
}

}  // namespace megacore::cuda
