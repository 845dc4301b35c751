#pragma once
// \brief CPU kernels of apply_rotary_emb (cpp/cpu/kernels/rotary.cpp). x/out are contiguous
//        [seq, inner, head_dim]; cos/sin are contiguous [seq, rotary_dim] in the accumulation dtype
//        (fp32, fp64 for fp64 x).
#include <ATen/core/Tensor.h>

#include "common/isa.h"

// backward = false: out = x * cos + rotate_half(x) * sin on the first rotary_dim features;
// backward = true: the transpose of that map (grad_x from grad_out). The rest pass through.
MEGACORE_CPU_KERNEL(rotary_emb, void(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                     const at::Tensor& out, bool backward))
