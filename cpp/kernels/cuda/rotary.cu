// apply_rotary_emb on CUDA: a block covers blockDim.y rows of [seq * inner, head_dim]; within a row, thread
// j < rotary_dim / 2 rotates the pair (j, j + rotary_dim / 2) and the others copy the pass-through features.
// The rotation itself is kernels/rotary.h's, shared with the CPU kernels.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/rotary.h"

namespace megacore::cuda {
namespace {

// Halves 1 = [:h], 2 = [h:r] of each row, rotated pairwise by kernels::rotary::rotate.
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
        kernels::rotary::rotate<Backward>(x1, x2, c1, c2, s1, s2, o1, o2);
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

cudaError_t rotary_emb(const kernels::RotaryEmb& p, cudaStream_t stream) {
  NvtxRange range(p.backward ? "megacore.apply_rotary_emb_backward" : "megacore.apply_rotary_emb");
  const int64_t rows = p.seq * p.inner, head_dim = p.head_dim, rotary_dim = p.rotary_dim;
  if (rows == 0 || head_dim == 0) return cudaSuccess;
  // Threads along a row: the per-row work rounded up to a warp, at most 256; the rest of the block's 256
  // threads take further rows.
  const int64_t work = rotary_dim / 2 + (head_dim - rotary_dim);
  const int tx = static_cast<int>(std::min<int64_t>(256, (work + 31) / 32 * 32));
  const dim3 block(tx, 256 / tx);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((rows + block.y - 1) / block.y, 65535LL * 16));
  MEGACORE_DISPATCH_FLOAT(p.dtype, T, {
    using A = acc_t<T>;
    const T* xp = static_cast<const T*>(p.x);
    const A* cp = static_cast<const A*>(p.cos);
    const A* sp = static_cast<const A*>(p.sin);
    T* op = static_cast<T*>(p.out);
    if (p.backward) {
      rotary_kernel<T, true><<<blocks, block, 0, stream>>>(xp, cp, sp, op, rows, p.inner, head_dim, rotary_dim);
    } else {
      rotary_kernel<T, false><<<blocks, block, 0, stream>>>(xp, cp, sp, op, rows, p.inner, head_dim, rotary_dim);
    }
    return cudaGetLastError();
  });
  return cudaSuccess;
}

}  // namespace megacore::cuda
