#pragma once
// The layer's attention sub-blocks: self-attention (QKV GEMM, RoPE, core attention by PyTorch's flash kernel or GEMM +
// megacore's fused masked softmax with an optional additive bias, dropout, output projection) and cross-attention (a
// decoder's queries to an encoder's memory), forward and backward, and their decoding steps over key/value caches.
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "transformer/config.h"
#include "transformer/pieces.h"

namespace megacore::transformer {

using Saved = std::vector<at::Tensor>;  // indexed by Slot

/// \brief Gradients of a column-parallel GEMM y = enter_region(x) @ w^T (+ b): x [s_local, b, in] ->
///        (grad_x [s_local, b, in], grad_w, grad_b or undefined). The input gradient's collective (all-reduce, or
///        reduce-scatter under sequence parallelism) runs while the weight gradient's GEMM computes.
struct ColumnGrads {
  at::Tensor x, weight, bias;
};
ColumnGrads column_parallel_backward(const Config& c, const TensorParallel& tp, const at::Tensor& g,
                                     const at::Tensor& x, const at::Tensor& w, bool has_bias);

// ---- self-attention -----------------------------------------------------------------------------------------------
/// \brief proj(attention(qkv(x))) out of the tensor-parallel region, before proj's bias: x [s_local, b, h] ->
///        [s_local, b, h]. bias: the additive bias on the scores [1 or b, np, s, s], or none. Keeps q, k, v, the
///        probabilities (unless recomputed) or flash's logsumexp, and the context in `saved`.
at::Tensor self_attention_forward(const Config& c, const TensorParallel& tp, const Dims& d, bool flash,
                                  const at::Tensor& x, const Params& p, const OptT& mask, const OptT& cos,
                                  const OptT& sin, const OptT& bias, int64_t seed, Saved& saved);

struct SelfAttentionGrads {
  at::Tensor x, qkv_weight, qkv_bias, proj_weight, bias;  // undefined where absent
};
/// \brief Backward of self_attention_forward; g [s_local, b, h] is its output's gradient.
SelfAttentionGrads self_attention_backward(const Config& c, const TensorParallel& tp, const Dims& d, bool flash,
                                           const at::Tensor& g, const at::Tensor& x, const Params& p,
                                           const OptT& mask, const OptT& cos, const OptT& sin, const OptT& bias,
                                           int64_t seed, const Saved& saved);

/// \brief The decoding step of self-attention: x [n, b, h], the new tokens at [position, position + n); their keys and
///        values are written into the caches [b, np, capacity, d] and attention covers [0, position + n) (masks aligned
///        to absolute positions; bias [1 or b, np, n, position + n]). -> [n, b, h] before proj's bias. No dropout.
at::Tensor self_attention_decode(const Config& c, const TensorParallel& tp, const Dims& d, const at::Tensor& x,
                                 const Params& p, const OptT& mask, const OptT& cos, const OptT& sin, const OptT& bias,
                                 const at::Tensor& key_cache, const at::Tensor& value_cache, int64_t position);

// ---- cross-attention ----------------------------------------------------------------------------------------------
/// \brief proj(attention(q(x), kv(memory))) out of the region, before proj's bias: x [s_local, b, h], memory
///        [m_local, b, h] -> [s_local, b, h]; memory_mask bool [b or 1, 1, s or 1, m], True = masked out.
at::Tensor cross_attention_forward(const Config& c, const TensorParallel& tp, const Dims& d, const at::Tensor& x,
                                   const at::Tensor& memory, const Params& p, const OptT& memory_mask, int64_t seed,
                                   Saved& saved);

struct CrossAttentionGrads {
  at::Tensor x, memory, q_weight, q_bias, kv_weight, kv_bias, proj_weight;
};
CrossAttentionGrads cross_attention_backward(const Config& c, const TensorParallel& tp, const Dims& d,
                                             const at::Tensor& g, const at::Tensor& x, const at::Tensor& memory,
                                             const Params& p, const OptT& memory_mask, int64_t seed,
                                             const Saved& saved);

/// \brief The decoding step of cross-attention: x [n, b, h]. With `memory` [m, b, h] its keys and values are computed
///        and written into the caches [b, np, m, d] (once per sequence); without, the caches are read. -> [n, b, h].
at::Tensor cross_attention_decode(const Config& c, const TensorParallel& tp, const Dims& d, const at::Tensor& x,
                                  const OptT& memory, const Params& p, const OptT& memory_mask,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache);

}  // namespace megacore::transformer
