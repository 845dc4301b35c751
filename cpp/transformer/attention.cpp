// The layer's attention sub-blocks (attention.h).
#include "transformer/attention.h"

#include <cmath>

#include "common/profiling.h"

namespace megacore::transformer {
namespace {

/// \brief The attention probabilities after dropout (a fresh tensor only when p > 0). bias_dropout_add's
///        backward is exactly `probs * mask / (1 - p)` with the mask its forward draws from `seed`: one pass,
///        without the zero residual the forward op would need.
at::Tensor dropped(const at::Tensor& probs, double p, int64_t seed) {
  if (p == 0.0) return probs;
  return std::get<0>(bias_dropout_add_backward(probs, p, seed, /*has_bias=*/false));
}

/// \brief [n, b, heads * d] -> [b, heads, n, d] contiguous.
at::Tensor to_heads(const at::Tensor& t, int64_t np, int64_t d) {
  return t.view({t.size(0), t.size(1), np, d}).permute({1, 2, 0, 3}).contiguous();
}

/// \brief [b, heads, n, d] -> [n, b, heads * d].
at::Tensor from_heads(const at::Tensor& t) {
  return t.permute({2, 0, 1, 3}).reshape({t.size(2), t.size(0), t.size(1) * t.size(3)});
}

/// \brief q, k, v of this rank's heads from qkv [n, b, np * 3 * d] (rows (head, {q, k, v}, d) as Megatron's), each
///        [b, np, n, d] contiguous, RoPE applied to q and k with cos/sin [n, rotary_dim].
std::tuple<at::Tensor, at::Tensor, at::Tensor> split_qkv(const at::Tensor& qkv, int64_t np, int64_t d, const OptT& cos,
                                                         const OptT& sin) {
  at::Tensor parts = qkv.view({qkv.size(0), qkv.size(1), np, 3, d});
  at::Tensor q = parts.select(3, 0), k = parts.select(3, 1), v = parts.select(3, 2);  // [n, b, np, d]
  if (cos.has_value()) {
    q = rotary(q, *cos, *sin, /*backward=*/false);
    k = rotary(k, *cos, *sin, /*backward=*/false);
  }
  auto to_bnsd = [](const at::Tensor& t) { return t.permute({1, 2, 0, 3}).contiguous(); };
  return {to_bnsd(q), to_bnsd(k), to_bnsd(v)};
}

/// \brief k, v of this rank's heads from kv [m, b, np * 2 * d] (rows (head, {k, v}, d)), each [b, np, m, d].
std::tuple<at::Tensor, at::Tensor> split_kv(const at::Tensor& kv, int64_t np, int64_t d) {
  at::Tensor parts = kv.view({kv.size(0), kv.size(1), np, 2, d});
  auto to_bnsd = [](const at::Tensor& t) { return t.permute({1, 2, 0, 3}).contiguous(); };
  return {to_bnsd(parts.select(3, 0)), to_bnsd(parts.select(3, 1))};
}

/// \brief Gradients of per-head tensors ([b, np, n, d] each) into the GEMM output layout [n, b, np * parts * d] with
///        rows (head, part, d); RoPE undone on the first `rotated` parts.
at::Tensor merge_heads(const std::vector<at::Tensor>& grads, int64_t rotated, const OptT& cos, const OptT& sin) {
  const auto& g0 = grads[0];
  const int64_t b = g0.size(0), np = g0.size(1), n = g0.size(2), d = g0.size(3), parts = grads.size();
  at::Tensor g = at::empty({n, b, np, parts, d}, g0.options());
  for (int64_t i = 0; i < parts; ++i) {
    at::Tensor gi = grads[i].permute({2, 0, 1, 3});  // [n, b, np, d]
    if (cos.has_value() && i < rotated) gi = rotary(gi, *cos, *sin, /*backward=*/true);
    g.select(3, i).copy_(gi);
  }
  return g.view({n, b, np * parts * d});
}

/// \brief Backward of the GEMM + softmax + dropout core: context = dropout(softmax(scores)) @ v with scores = q @ k^T.
///        -> (grad_q, grad_k, grad_v, grad_bias or undefined). probs_dropped undefined: rebuilt from probs and seed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> core_backward(const at::Tensor& g, const at::Tensor& q,
                                                                         const at::Tensor& k, const at::Tensor& v,
                                                                         const at::Tensor& probs,
                                                                         const at::Tensor& probs_dropped, double p,
                                                                         int64_t seed, double scale, const OptT& bias) {
  at::Tensor g_v = at::matmul((probs_dropped.defined() ? probs_dropped : dropped(probs, p, seed)).transpose(-2, -1), g);
  at::Tensor g_probs = at::matmul(g, v.transpose(-2, -1));  // [b, np, sq, sk]
  if (p > 0.0) g_probs = std::get<0>(bias_dropout_add_backward(g_probs, p, seed, false));
  at::Tensor g_scores, g_bias;
  if (bias.has_value()) {
    std::tie(g_scores, g_bias) = biased_softmax_backward(g_probs, probs, scale, bias->sizes());
  } else {
    g_scores = softmax_backward(g_probs, probs, scale);
  }
  at::Tensor g_q = at::matmul(g_scores, k);
  at::Tensor g_k = at::matmul(g_scores.transpose(-2, -1), q);
  return {g_q, g_k, g_v, g_bias};
}

/// \brief The self-attention probabilities of scores [b, np, sq, sk] with the configured mask and the optional bias.
at::Tensor self_softmax(const Config& c, const at::Tensor& scores, const OptT& mask, const OptT& bias, double scale) {
  return bias.has_value() ? biased_softmax(c, scores, *bias, mask, scale) : masked_softmax(c, scores, mask, scale);
}

}  // namespace

ColumnGrads column_parallel_backward(const Config& c, const TensorParallel& tp, const at::Tensor& g,
                                     const at::Tensor& x, const at::Tensor& w, bool has_bias) {
  const at::Tensor x_full = enter_region(c, tp, x);  // [s, b, in]: re-gathered under sequence parallelism
  PendingRegionBackward pending(c, tp, at::matmul(g, w));  // the input gradient, reduced while ...
  ColumnGrads out;
  out.weight = at::mm(g.reshape({-1, g.size(-1)}).t(), x_full.reshape({-1, x_full.size(-1)}));  // ... this runs
  if (has_bias) out.bias = bias_grad(g);
  out.x = pending.wait();
  return out;
}

// ---- self-attention -----------------------------------------------------------------------------------------------

at::Tensor self_attention_forward(const Config& c, const TensorParallel& tp, const Dims& d, bool flash,
                                  const at::Tensor& x, const Params& p, const OptT& mask, const OptT& cos,
                                  const OptT& sin, const OptT& bias, int64_t seed, Saved& saved) {
  {
    ProfilePhase phase("megacore.transformer_layer.qkv");
    at::Tensor qkv = matmul_t(enter_region(c, tp, x), p[k_qkv_weight], p.opt(k_qkv_bias));  // [s, b, 3 np d]
    std::tie(saved[kSlot_q], saved[kSlot_k], saved[kSlot_v]) = split_qkv(qkv, d.np, d.d, cos, sin);
  }
  const at::Tensor &q = saved[kSlot_q], &k = saved[kSlot_k], &v = saved[kSlot_v];
  const double scale = c.scale(d.d);
  const bool causal = c.mask == Mask::kCausal;
  at::Tensor context;  // [b, np, s, d]
  {
    ProfilePhase phase("megacore.transformer_layer.attention");
    if (flash && q.is_cpu()) {
      auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, std::nullopt, scale);
      context = out;
      saved[kSlot_lse] = lse;
    } else if (flash) {
      auto r = at::_scaled_dot_product_flash_attention(q, k, v, c.attention_p(), causal, false, scale);
      context = std::get<0>(r);
      saved[kSlot_lse] = std::get<1>(r);
      // Philox state of the dropout (seed, offset); undefined when there is none.
      if (std::get<6>(r).defined()) saved[kSlot_rng_state] = std::get<6>(r);
      if (std::get<7>(r).defined()) saved[kSlot_rng_unused] = std::get<7>(r);
    } else {
      at::Tensor probs = self_softmax(c, at::matmul(q, k.transpose(-2, -1)), mask, bias, scale);  // [b, np, s, s]
      at::Tensor probs_dropped = dropped(probs, c.attention_p(), seed);
      context = at::matmul(probs_dropped, v);
      if (!c.recompute_attention) {  // keep both: backward then needs no pass over [b, np, s, s] to rebuild them
        saved[kSlot_probs] = probs;
        if (c.attention_p() > 0.0) saved[kSlot_probs_dropped] = probs_dropped;
      }
    }
    saved[kSlot_context] = from_heads(context);  // [s, b, np * d]
  }
  ProfilePhase phase("megacore.transformer_layer.proj");
  return exit_region(c, tp, matmul_t(saved[kSlot_context], p[k_proj_weight]));  // [s_local, b, h]
}

SelfAttentionGrads self_attention_backward(const Config& c, const TensorParallel& tp, const Dims& d, bool flash,
                                           const at::Tensor& g, const at::Tensor& x, const Params& p,
                                           const OptT& mask, const OptT& cos, const OptT& sin, const OptT& bias,
                                           int64_t seed, const Saved& saved) {
  SelfAttentionGrads out;
  at::Tensor g_context;
  {
    ProfilePhase phase("megacore.transformer_layer_backward.proj");
    std::tie(g_context, out.proj_weight) =
        linear_backward(exit_region_backward(c, tp, g), saved[kSlot_context], p[k_proj_weight]);
  }
  const double scale = c.scale(d.d);
  const bool causal = c.mask == Mask::kCausal;
  const at::Tensor &q = saved[kSlot_q], &k = saved[kSlot_k], &v = saved[kSlot_v];
  at::Tensor g_q, g_k, g_v;
  {
    ProfilePhase phase("megacore.transformer_layer_backward.attention");
    at::Tensor gc = g_context.view({d.s, d.b, d.np, d.d}).permute({1, 2, 0, 3});  // [b, np, s, d]
    if (flash) {
      at::Tensor o = saved[kSlot_context].view({d.s, d.b, d.np, d.d}).permute({1, 2, 0, 3});
      if (q.is_cpu()) {
        std::tie(g_q, g_k, g_v) = at::_scaled_dot_product_flash_attention_for_cpu_backward(
            gc.contiguous(), q, k, v, o, saved[kSlot_lse], 0.0, causal, std::nullopt, scale);
      } else {
        auto or_undefined = [](const at::Tensor& t) { return t.numel() ? t : at::Tensor(); };
        std::tie(g_q, g_k, g_v) = at::_scaled_dot_product_flash_attention_backward(
            gc.contiguous(), q, k, v, o, saved[kSlot_lse], at::Tensor(), at::Tensor(), d.s, d.s, c.attention_p(),
            causal, or_undefined(saved[kSlot_rng_state]), or_undefined(saved[kSlot_rng_unused]), scale);
      }
    } else {
      // Selective recomputation: the probabilities were not kept, rebuild them from q and k.
      const bool recompute = c.recompute_attention;
      at::Tensor probs = recompute ? self_softmax(c, at::matmul(q, k.transpose(-2, -1)), mask, bias, scale)
                                   : saved[kSlot_probs];
      const bool kept = !recompute && c.attention_p() > 0.0;
      std::tie(g_q, g_k, g_v, out.bias) = core_backward(gc, q, k, v, probs,
                                                        kept ? saved[kSlot_probs_dropped] : at::Tensor(),
                                                        c.attention_p(), seed, scale, bias);
    }
  }
  ProfilePhase phase("megacore.transformer_layer_backward.qkv");
  at::Tensor g_qkv = merge_heads({g_q, g_k, g_v}, 2, cos, sin);  // [s, b, np * 3 * d]
  ColumnGrads col = column_parallel_backward(c, tp, g_qkv, x, p[k_qkv_weight], p.has(k_qkv_bias));
  out.x = col.x;
  out.qkv_weight = col.weight;
  out.qkv_bias = col.bias;
  return out;
}

at::Tensor self_attention_decode(const Config& c, const TensorParallel& tp, const Dims& d, const at::Tensor& x,
                                 const Params& p, const OptT& mask, const OptT& cos, const OptT& sin, const OptT& bias,
                                 const at::Tensor& key_cache, const at::Tensor& value_cache, int64_t position) {
  const int64_t n = x.size(0), end = position + n;
  at::Tensor qkv = matmul_t(x, p[k_qkv_weight], p.opt(k_qkv_bias));  // [n, b, 3 np d]
  auto [q, k, v] = split_qkv(qkv, d.np, d.d, cos, sin);                // [b, np, n, d]
  key_cache.narrow(2, position, n).copy_(k);
  value_cache.narrow(2, position, n).copy_(v);
  const double scale = c.scale(d.d);
  at::Tensor context;  // [b, np, n, d]
  if (position == 0 && c.mask != Mask::kPadding && !bias.has_value() &&
      uses_flash(c, x.device().type(), x.scalar_type(), d.d)) {
    // A prompt from the start: the training path's flash attention.
    const bool causal = c.mask == Mask::kCausal;
    if (x.is_cpu()) {
      context = std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, std::nullopt, scale));
    } else {
      context = std::get<0>(at::_scaled_dot_product_flash_attention(q, k, v, 0.0, causal, false, scale));
    }
  } else if (n == 1 && x.is_cpu() && !bias.has_value() && (c.mask == Mask::kCausal || c.mask == Mask::kNone) &&
             c.backend != Backend::kFusedSoftmax) {
    // One new token sees every cached key: PyTorch's CPU flash kernel, unmasked, saves the scores' round trip.
    context = std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(
        q, key_cache.narrow(2, 0, end), value_cache.narrow(2, 0, end), 0.0, false, std::nullopt, scale));
  } else {
    at::Tensor scores = at::matmul(q, key_cache.narrow(2, 0, end).transpose(-2, -1));  // [b, np, n, end]
    context = at::matmul(self_softmax(c, scores, mask, bias, scale), value_cache.narrow(2, 0, end));
  }
  return exit_region(c, tp, matmul_t(from_heads(context), p[k_proj_weight]));
}

// ---- cross-attention ----------------------------------------------------------------------------------------------

at::Tensor cross_attention_forward(const Config& c, const TensorParallel& tp, const Dims& d, const at::Tensor& x,
                                   const at::Tensor& memory, const Params& p, const OptT& memory_mask, int64_t seed,
                                   Saved& saved) {
  {
    ProfilePhase phase("megacore.transformer_layer.cross_qkv");
    saved[kSlot_cross_q] = to_heads(matmul_t(enter_region(c, tp, x), p[k_cross_q_weight], p.opt(k_cross_q_bias)),
                                    d.np, d.d);  // [b, np, s, d]
    at::Tensor kv = matmul_t(enter_region(c, tp, memory), p[k_cross_kv_weight], p.opt(k_cross_kv_bias));
    std::tie(saved[kSlot_cross_k], saved[kSlot_cross_v]) = split_kv(kv, d.np, d.d);  // [b, np, m, d]
  }
  {
    ProfilePhase phase("megacore.transformer_layer.cross_attention");
    const double scale = c.scale(d.d);
    at::Tensor probs = padded_softmax(at::matmul(saved[kSlot_cross_q], saved[kSlot_cross_k].transpose(-2, -1)),
                                      memory_mask, scale);  // [b, np, s, m]
    at::Tensor probs_dropped = dropped(probs, c.attention_p(), seed);
    saved[kSlot_cross_context] = from_heads(at::matmul(probs_dropped, saved[kSlot_cross_v]));  // [s, b, np * d]
    if (!c.recompute_attention) {
      saved[kSlot_cross_probs] = probs;
      if (c.attention_p() > 0.0) saved[kSlot_cross_probs_dropped] = probs_dropped;
    }
  }
  ProfilePhase phase("megacore.transformer_layer.cross_proj");
  return exit_region(c, tp, matmul_t(saved[kSlot_cross_context], p[k_cross_proj_weight]));
}

CrossAttentionGrads cross_attention_backward(const Config& c, const TensorParallel& tp, const Dims& d,
                                             const at::Tensor& g, const at::Tensor& x, const at::Tensor& memory,
                                             const Params& p, const OptT& memory_mask, int64_t seed,
                                             const Saved& saved) {
  CrossAttentionGrads out;
  at::Tensor g_context;
  {
    ProfilePhase phase("megacore.transformer_layer_backward.cross_proj");
    std::tie(g_context, out.proj_weight) =
        linear_backward(exit_region_backward(c, tp, g), saved[kSlot_cross_context], p[k_cross_proj_weight]);
  }
  const at::Tensor &q = saved[kSlot_cross_q], &k = saved[kSlot_cross_k], &v = saved[kSlot_cross_v];
  const double scale = c.scale(d.d);
  at::Tensor g_q, g_k, g_v, unused;
  {
    ProfilePhase phase("megacore.transformer_layer_backward.cross_attention");
    const bool recompute = c.recompute_attention;
    at::Tensor probs = recompute ? padded_softmax(at::matmul(q, k.transpose(-2, -1)), memory_mask, scale)
                                 : saved[kSlot_cross_probs];
    const bool kept = !recompute && c.attention_p() > 0.0;
    std::tie(g_q, g_k, g_v, unused) =
        core_backward(g_context.view({d.s, d.b, d.np, d.d}).permute({1, 2, 0, 3}), q, k, v, probs,
                      kept ? saved[kSlot_cross_probs_dropped] : at::Tensor(), c.attention_p(), seed, scale, OptT());
  }
  ProfilePhase phase("megacore.transformer_layer_backward.cross_qkv");
  ColumnGrads gq = column_parallel_backward(c, tp, from_heads(g_q), x, p[k_cross_q_weight], p.has(k_cross_q_bias));
  ColumnGrads gkv = column_parallel_backward(c, tp, merge_heads({g_k, g_v}, 0, OptT(), OptT()), memory,
                                             p[k_cross_kv_weight], p.has(k_cross_kv_bias));
  out.x = gq.x;
  out.q_weight = gq.weight;
  out.q_bias = gq.bias;
  out.memory = gkv.x;
  out.kv_weight = gkv.weight;
  out.kv_bias = gkv.bias;
  return out;
}

at::Tensor cross_attention_decode(const Config& c, const TensorParallel& tp, const Dims& d, const at::Tensor& x,
                                  const OptT& memory, const Params& p, const OptT& memory_mask,
                                  const at::Tensor& key_cache, const at::Tensor& value_cache) {
  if (memory.has_value()) {  // once per sequence: the memory's keys and values
    auto [k, v] = split_kv(matmul_t(*memory, p[k_cross_kv_weight], p.opt(k_cross_kv_bias)), d.np, d.d);
    key_cache.copy_(k);
    value_cache.copy_(v);
  }
  at::Tensor q = to_heads(matmul_t(x, p[k_cross_q_weight], p.opt(k_cross_q_bias)), d.np, d.d);  // [b, np, n, d]
  at::Tensor probs = padded_softmax(at::matmul(q, key_cache.transpose(-2, -1)), memory_mask, c.scale(d.d));
  return exit_region(c, tp, matmul_t(from_heads(at::matmul(probs, value_cache)), p[k_cross_proj_weight]));
}

}  // namespace megacore::transformer
