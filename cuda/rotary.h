#pragma once
// \brief CUDA launchers of apply_rotary_emb. x/out are contiguous [seq, inner, head_dim]; cos/sin are
//        contiguous [seq, rotary_dim] in the accumulation dtype (fp32, fp64 for fp64 x).
#include "common.h"

namespace megacore::cuda {

/// \brief backward = false: out = x * cos + rotate_half(x) * sin on the first rotary_dim features;
///        backward = true: its transpose (grad_x from grad_out). Features past rotary_dim are copied.
cudaError_t apply_rotary_emb(const void* x, const void* cos, const void* sin, void* out, int64_t seq, int64_t inner,
                             int64_t head_dim, int64_t rotary_dim, DType dtype, bool backward, cudaStream_t stream);

}  // namespace megacore::cuda
