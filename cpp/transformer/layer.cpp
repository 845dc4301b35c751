// The transformer layer as torch ops: megacore::transformer_layer (forward, for training), its backward, and
// megacore::transformer_layer_decode (forward over new tokens with a key/value cache, for generation). One
// implementation for every device (CompositeExplicitAutograd): ATen's GEMMs, megacore's fused ops and
// collectives through the dispatcher (pieces.h). What the ops take and keep is defined once in config.h.
//
//   pre-LN  (GPT):  h = x + drop(proj(attn(norm1(x))))        out = h + drop(mlp(norm2(h)))
//   post-LN (BERT): h = norm1(x + drop(proj(attn(x))))        out = norm2(h + drop(mlp(h)))
//
// Shapes: x is [s_local, b, h] (s_local = s / tp with sequence parallelism, else s); the GEMMs see the whole
// sequence [s, b, ...]; each rank owns np = heads / tp heads (head_dim d) and ffn / tp MLP columns.
// Tensor-parallel regions (Megatron's f/g conjugate pairs) are entered before the column-parallel GEMMs and
// left after the row-parallel ones (pieces.h).
//
// The forward returns the tensors backward needs as a fixed list of slots (config.h's slot table), with [0]
// tensors in the slots a configuration does not use.
#include <ATen/ATen.h>
#include <ATen/core/stack.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/checks.h"
#include "common/profiling.h"
#include "ops/op.h"
#include "transformer/attention.h"
#include "transformer/config.h"
#include "transformer/mlp.h"
#include "transformer/pieces.h"

namespace megacore::transformer {
namespace {

constexpr const char* kBackwardOp = "transformer_layer_backward";
constexpr const char* kDecodeOp = "transformer_layer_decode";

// ---- arguments ------------------------------------------------------------------------------------------------

/// \brief The schema's parameter arguments, from config.h's table: "Tensor? attention_norm_weight, ...".
std::string param_schema() {
  std::string out;
  for (const auto& p : param_table()) out += std::string(out.empty() ? "" : ", ") + (p.required ? "Tensor " : "Tensor? ") + p.arg;
  return out;
}

/// \brief Reads a boxed kernel's arguments in schema order.
class Args {
 public:
  explicit Args(c10::ArrayRef<c10::IValue> args) : args_(args) {}
  const at::Tensor& tensor() { return args_[i_++].toTensor(); }
  OptT optional() {
    const c10::IValue& v = args_[i_++];
    return v.isNone() ? OptT() : OptT(v.toTensor());
  }
  Params params() {
    Params p;
    for (auto& t : p.t) t = optional();
    return p;
  }
  int64_t integer() { return args_[i_++].toInt(); }
  std::vector<at::Tensor> tensors() { return args_[i_++].toTensorVector(); }
  std::string string() { return std::string(args_[i_++].toStringRef()); }

 private:
  c10::ArrayRef<c10::IValue> args_;
  size_t i_ = 0;
};

/// \brief An optional tensor argument must match `like`'s dtype/device and be 1-D of length `n`.
void check_optional_vector(const char* op, const char* name, const OptT& t, const at::Tensor& like, int64_t n,
                           const char* what) {
  if (!t.has_value()) return;
  check_same_dtype_device(op, name, *t, "hidden", like);
  check_vector(op, name, *t, n, what);
}

/// \brief A weight must match `hidden`'s dtype/device and be [rows, cols].
void check_matrix(const char* op, const char* name, const OptT& w, const at::Tensor& hidden, int64_t rows,
                  int64_t cols, const char* what) {
  MEGACORE_CHECK_ARG(w.has_value() && w->defined(), op, name, " is undefined");
  check_same_dtype_device(op, name, *w, "hidden", hidden);
  MEGACORE_CHECK_ARG(w->dim() == 2 && w->size(0) == rows && w->size(1) == cols, op, name, " has shape ",
                     shape_str(w->sizes()), ", expected [", rows, ", ", cols, "] (", what, ")");
}

/// \brief Checks hidden and the parameters; returns the sizes. q_len / kv_len: the queries and keys attention
///        sees (the full sequence in training; the new tokens and the cached ones in decoding).
Dims check_inputs(const char* op, const Config& c, const TensorParallel& tp, const at::Tensor& hidden, const Params& p,
                  bool decoding, int64_t m_local = 0) {
  check_float_tensor(op, "hidden", hidden);
  MEGACORE_CHECK_ARG(hidden.dim() == 3, op, "hidden has shape ", shape_str(hidden.sizes()),
                     ", expected [seq, batch, hidden]");
  const OptT& fc1 = p.opt(k_fc1_weight);
  MEGACORE_CHECK_ARG(fc1.has_value() && fc1->dim() == 2, op, "fc1_weight must be a [ffn / tp, hidden] matrix");
  Config local = c;
  if (decoding) local.sequence_parallel = false;
  const Dims d = dims_of(local, tp, hidden.size(0), hidden.size(1), hidden.size(2), fc1->size(0), m_local);
  check_optional_vector(op, "attention_norm_weight", p.opt(k_attention_norm_weight), hidden, d.h, "the hidden size");
  check_optional_vector(op, "attention_norm_bias", p.opt(k_attention_norm_bias), hidden, d.h, "the hidden size");
  check_optional_vector(op, "mlp_norm_weight", p.opt(k_mlp_norm_weight), hidden, d.h, "the hidden size");
  check_optional_vector(op, "mlp_norm_bias", p.opt(k_mlp_norm_bias), hidden, d.h, "the hidden size");
  MEGACORE_CHECK_ARG(c.norm == Norm::kLayerNorm || (!p.has(k_attention_norm_bias) && !p.has(k_mlp_norm_bias)), op,
                     "rmsnorm takes no norm bias");
  check_matrix(op, "qkv_weight", p.opt(k_qkv_weight), hidden, 3 * d.np * d.d, d.h, "3 * heads / tp * head_dim, hidden");
  check_optional_vector(op, "qkv_bias", p.opt(k_qkv_bias), hidden, 3 * d.np * d.d, "3 * heads / tp * head_dim");
  check_matrix(op, "proj_weight", p.opt(k_proj_weight), hidden, d.h, d.np * d.d, "hidden, heads / tp * head_dim");
  check_optional_vector(op, "proj_bias", p.opt(k_proj_bias), hidden, d.h, "the hidden size");
  const int64_t fc1_rows = c.gated() ? 2 * d.f : d.f;
  check_matrix(op, "fc1_weight", fc1, hidden, fc1_rows, d.h, c.gated() ? "2 * ffn / tp ([gate; up]), hidden" : "ffn / tp, hidden");
  check_optional_vector(op, "fc1_bias", p.opt(k_fc1_bias), hidden, fc1_rows, c.gated() ? "2 * ffn / tp" : "ffn / tp");
  check_matrix(op, "fc2_weight", p.opt(k_fc2_weight), hidden, d.h, d.f, "hidden, ffn / tp");
  check_optional_vector(op, "fc2_bias", p.opt(k_fc2_bias), hidden, d.h, "the hidden size");
  return d;
}

/// \brief The padding mask (bool [b or 1, 1, q_len or 1, kv_len], True = masked out) and RoPE tables
///        ([q_len, rotary_dim] each: the queries' positions) of a call.
void check_mask_and_rotary(const char* op, const Config& c, const at::Tensor& hidden, const Dims& d, int64_t q_len,
                           int64_t kv_len, const OptT& mask, const OptT& cos, const OptT& sin) {
  if (c.mask == Mask::kPadding) {
    MEGACORE_CHECK_ARG(mask.has_value(), op, "mask_kind 'padding' needs attention_mask");
    const at::Tensor& m = *mask;
    MEGACORE_CHECK_TYPE(m.scalar_type() == at::kBool, op, "attention_mask has dtype ", m.scalar_type(),
                        ", expected Bool (True = masked out)");
    check_same_device(op, "attention_mask", m, "hidden", hidden);
    MEGACORE_CHECK_ARG(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == d.b) && m.size(1) == 1 &&
                           (m.size(2) == 1 || m.size(2) == q_len) && m.size(3) == kv_len,
                       op, "attention_mask has shape ", shape_str(m.sizes()), ", expected [batch or 1, 1, ",
                       "queries or 1, keys] = [", d.b, ", 1, ", q_len, ", ", kv_len, "]");
  } else {
    MEGACORE_CHECK_ARG(!mask.has_value(), op, "attention_mask is only taken with mask_kind 'padding'");
  }
  MEGACORE_CHECK_ARG(cos.has_value() == sin.has_value(), op, "rotary_cos and rotary_sin go together");
  if (cos.has_value()) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"rotary_cos", *cos}, {"rotary_sin", *sin}}) {
      check_float_tensor(op, name, t);
      check_same_device(op, name, t, "hidden", hidden);
      MEGACORE_CHECK_ARG(t.dim() == 2 && t.size(0) == q_len && t.size(1) % 2 == 0 && t.size(1) <= d.d, op, name,
                         " has shape ", shape_str(t.sizes()), ", expected [", q_len,
                         " (the queries' positions), rotary_dim] with rotary_dim even and <= head_dim=", d.d);
    }
  }
}

int64_t seed_value(const char* op, const at::Tensor& seed) {
  MEGACORE_CHECK_ARG(seed.defined() && seed.scalar_type() == at::kLong && seed.device().is_cpu() && seed.numel() == 1,
                     op, "seed must be an int64 CPU tensor of one element");
  return *seed.const_data_ptr<int64_t>();
}

/// \brief The norm's output, its statistics kept in `saved` when given.
at::Tensor norm(const Config& c, const at::Tensor& x, const Params& p, Param w, Param b, Saved* saved, Slot mean,
                Slot rstd) {
  auto [out, m, r] = norm_forward(c, x, p.opt(w), p.opt(b));
  if (saved != nullptr) {
    (*saved)[mean] = m;
    (*saved)[rstd] = r;
  }
  return out;
}

/// \brief A residual sub-block of the layer (self-attention, cross-attention, MLP):
///   pre-LN:  next = x + drop(body(norm(x)) + out_bias)
///   post-LN: next = norm(x + drop(body(x) + out_bias))
/// with its norm's parameters, the slots of its norm statistics, its input (pre-LN: norm(x); post-LN: x, unless it is
/// the layer's input) and its residual sum, its dropout site and the bias added after the body.
struct SubBlock {
  const char* name;  // the profiler phase of its norm: megacore.transformer_layer.<name>_norm
  Param norm_weight, norm_bias;
  Slot mean, rstd, in, res;
  DropoutSite site;
  Param out_bias;
};
constexpr SubBlock kSelfAttention{"attention",    k_attention_norm_weight, k_attention_norm_bias, kSlot_norm1_mean,
                                  kSlot_norm1_rstd, kSlot_attn_in, kSlot_res1, DropoutSite::kAfterAttention,
                                  k_proj_bias};
constexpr SubBlock kCrossAttention{"cross_attention", k_cross_norm_weight, k_cross_norm_bias, kSlot_cross_norm_mean,
                                   kSlot_cross_norm_rstd, kSlot_cross_in, kSlot_res_cross,
                                   DropoutSite::kAfterCrossAttention, k_cross_proj_bias};
constexpr SubBlock kMlp{"mlp", k_mlp_norm_weight, k_mlp_norm_bias, kSlot_norm2_mean, kSlot_norm2_rstd, kSlot_mlp_in,
                        kSlot_res2, DropoutSite::kAfterMlp, k_fc2_bias};

std::string phase_name(const char* pass, const char* block, const char* what) {
  return std::string("megacore.") + pass + "." + block + what;
}

/// \brief One sub-block forward: x -> the next hidden state; body(in) -> the body's output before out_bias.
template <typename Body>
at::Tensor sub_block_forward(const Config& c, const TensorParallel& tp, const SubBlock& sb, const Params& p,
                             const at::Tensor& x, bool first, bool last, int64_t seed, Saved& saved, Body body) {
  at::Tensor in = x;
  if (c.pre_norm) {
    ProfilePhase phase(phase_name(kOp, sb.name, "_norm").c_str());
    in = saved[sb.in] = norm(c, x, p, sb.norm_weight, sb.norm_bias, &saved, sb.mean, sb.rstd);
  } else if (!first) {
    saved[sb.in] = x;
  }
  at::Tensor y = body(in);
  at::Tensor res;
  {
    ProfilePhase phase("megacore.transformer_layer.residual");
    res = bias_dropout_add(y, p.opt(sb.out_bias), x, c.hidden_p(), site_seed(seed, sb.site, site_rank(c, tp, sb.site)));
  }
  if (c.pre_norm) {
    if (!last) saved[sb.res] = res;  // the next sub-block's input: its norm's backward reads it
    return res;
  }
  saved[sb.res] = res;
  ProfilePhase phase(phase_name(kOp, sb.name, "_norm").c_str());
  return norm(c, res, p, sb.norm_weight, sb.norm_bias, &saved, sb.mean, sb.rstd);
}

/// \brief One sub-block backward: g, the next hidden state's gradient -> x's. x: the sub-block's input;
///        body_backward(g_y, in) -> in's gradient (storing the body's parameter gradients itself).
template <typename BodyBackward>
at::Tensor sub_block_backward(const Config& c, const TensorParallel& tp, const SubBlock& sb, const Params& p,
                              const at::Tensor& g, const at::Tensor& x, int64_t seed, const Saved& saved,
                              std::vector<at::Tensor>& grads, BodyBackward body_backward) {
  auto grad = [&](Param q) -> at::Tensor& { return grads[1 + q]; };
  at::Tensor g_res = g;
  if (!c.pre_norm) {
    ProfilePhase phase(phase_name(kBackwardOp, sb.name, "_norm").c_str());
    std::tie(g_res, grad(sb.norm_weight), grad(sb.norm_bias)) = norm_backward(
        c, g, saved[sb.res], p.opt(sb.norm_weight), p.opt(sb.norm_bias), saved[sb.mean], saved[sb.rstd]);
  }
  at::Tensor g_y;
  {
    ProfilePhase phase("megacore.transformer_layer_backward.residual");
    std::tie(g_y, grad(sb.out_bias)) = bias_dropout_add_backward(
        g_res, c.hidden_p(), site_seed(seed, sb.site, site_rank(c, tp, sb.site)), p.has(sb.out_bias));
  }
  at::Tensor g_in = body_backward(g_y, c.pre_norm ? saved[sb.in] : x);
  if (!c.pre_norm) return g_in.add(g_res);
  ProfilePhase phase(phase_name(kBackwardOp, sb.name, "_norm").c_str());
  at::Tensor g_x;
  std::tie(g_x, grad(sb.norm_weight), grad(sb.norm_bias)) =
      norm_backward(c, g_in, x, p.opt(sb.norm_weight), p.opt(sb.norm_bias), saved[sb.mean], saved[sb.rstd]);
  return g_x.add(g_res);
}

/// \brief The tensor arguments of a call besides hidden and the parameters.
struct Inputs {
  OptT mask, cos, sin, bias, memory, memory_mask;
};

/// \brief Checks the attention bias and the cross-attention inputs against the configuration.
void check_extras(const char* op, const Config& c, const at::Tensor& hidden, const Dims& d, const Params& p,
                  const Inputs& in, int64_t q_len, int64_t kv_len, bool memory_required) {
  MEGACORE_CHECK_ARG(in.bias.has_value() == c.attention_bias, op,
                     c.attention_bias ? "attention_bias is missing (the config says attention_bias=true)"
                                      : "attention_bias is given but the config says attention_bias=false");
  if (in.bias.has_value()) {
    const at::Tensor& t = *in.bias;
    check_same_dtype_device(op, "attention_bias", t, "hidden", hidden);
    MEGACORE_CHECK_ARG(t.dim() == 4 && (t.size(0) == 1 || t.size(0) == d.b) && t.size(1) == d.np &&
                           t.size(2) == q_len && t.size(3) == kv_len,
                       op, "attention_bias has shape ", shape_str(t.sizes()), ", expected [batch or 1, heads / tp, ",
                       "queries, keys] = [", d.b, ", ", d.np, ", ", q_len, ", ", kv_len, "]");
  }
  if (!c.cross_attention) {
    for (Param q : {k_cross_norm_weight, k_cross_norm_bias, k_cross_q_weight, k_cross_q_bias, k_cross_kv_weight,
                    k_cross_kv_bias, k_cross_proj_weight, k_cross_proj_bias}) {
      MEGACORE_CHECK_ARG(!p.has(q), op, param_table()[q].arg, " is given but the config says cross_attention=false");
    }
    MEGACORE_CHECK_ARG(!in.memory.has_value() && !in.memory_mask.has_value(), op,
                       "memory and memory_mask are only taken with cross_attention=true");
    return;
  }
  MEGACORE_CHECK_ARG(in.memory.has_value() || !memory_required, op, "cross_attention needs memory");
  if (in.memory.has_value()) {
    const at::Tensor& m = *in.memory;
    check_same_dtype_device(op, "memory", m, "hidden", hidden);
    MEGACORE_CHECK_ARG(m.dim() == 3 && m.size(1) == d.b && m.size(2) == d.h, op, "memory has shape ",
                       shape_str(m.sizes()), ", expected [memory length, batch=", d.b, ", hidden=", d.h, "]");
  }
  const char* norm_what = "the hidden size";
  for (auto [q, name] : {std::pair{k_cross_norm_weight, "cross_norm_weight"}, {k_cross_norm_bias, "cross_norm_bias"}}) {
    if (p.has(q)) {
      check_same_dtype_device(op, name, *p.opt(q), "hidden", hidden);
      check_vector(op, name, *p.opt(q), d.h, norm_what);
    }
  }
  MEGACORE_CHECK_ARG(c.norm == Norm::kLayerNorm || !p.has(k_cross_norm_bias), op, "rmsnorm takes no norm bias");
  auto matrix = [&](Param q, int64_t rows, int64_t cols, const char* what) {
    const char* name = param_table()[q].arg;
    MEGACORE_CHECK_ARG(p.has(q), op, name, " is required with cross_attention=true");
    check_same_dtype_device(op, name, *p.opt(q), "hidden", hidden);
    MEGACORE_CHECK_ARG(p.opt(q)->dim() == 2 && p.opt(q)->size(0) == rows && p.opt(q)->size(1) == cols, op, name,
                       " has shape ", shape_str(p.opt(q)->sizes()), ", expected [", rows, ", ", cols, "] (", what, ")");
  };
  matrix(k_cross_q_weight, d.np * d.d, d.h, "heads / tp * head_dim, hidden");
  matrix(k_cross_kv_weight, 2 * d.np * d.d, d.h, "2 * heads / tp * head_dim, hidden");
  matrix(k_cross_proj_weight, d.h, d.np * d.d, "hidden, heads / tp * head_dim");
  for (auto [q, n] : {std::pair{k_cross_q_bias, d.np * d.d}, {k_cross_kv_bias, 2 * d.np * d.d}, {k_cross_proj_bias, d.h}}) {
    if (p.has(q)) {
      check_same_dtype_device(op, param_table()[q].arg, *p.opt(q), "hidden", hidden);
      check_vector(op, param_table()[q].arg, *p.opt(q), n, "its GEMM's output size");
    }
  }
  if (in.memory_mask.has_value()) {
    const at::Tensor& m = *in.memory_mask;
    MEGACORE_CHECK_TYPE(m.scalar_type() == at::kBool, op, "memory_mask has dtype ", m.scalar_type(),
                        ", expected Bool (True = masked out)");
    check_same_device(op, "memory_mask", m, "hidden", hidden);
    MEGACORE_CHECK_ARG(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == d.b) && m.size(1) == 1 &&
                           (m.size(2) == 1 || m.size(2) == q_len) && m.size(3) == d.m,
                       op, "memory_mask has shape ", shape_str(m.sizes()), ", expected [batch or 1, 1, queries or 1, ",
                       "memory length] = [", d.b, ", 1, ", q_len, ", ", d.m, "]");
  }
}

// ---- training: forward and backward -----------------------------------------------------------------------------

/// \brief The forward: (output [s_local, b, h], saved slots).
std::tuple<at::Tensor, std::vector<at::Tensor>> forward(const Config& c, const at::Tensor& x, const Params& p,
                                                        const Inputs& in, int64_t seed) {
  const TensorParallel tp = tensor_parallel_of(c);
  const int64_t m_local = in.memory.has_value() ? in.memory->size(0) : 0;
  const Dims d = check_inputs(kOp, c, tp, x, p, /*decoding=*/false, m_local);
  check_mask_and_rotary(kOp, c, x, d, d.s, d.s, in.mask, in.cos, in.sin);
  check_extras(kOp, c, x, d, p, in, d.s, d.s, /*memory_required=*/true);
  const bool flash = uses_flash(c, x.device().type(), x.scalar_type(), d.d);
  Saved saved(kNumSlots);  // every slot its own tensor: an op's outputs may not alias
  for (auto& t : saved) t = nothing(x);
  auto seed_of = [&](DropoutSite site) { return site_seed(seed, site, site_rank(c, tp, site)); };

  // Each phase is a ProfilePhase scope, so Nsight and torch.profiler show it by name.
  at::Tensor h = sub_block_forward(c, tp, kSelfAttention, p, x, true, false, seed, saved, [&](const at::Tensor& t) {
    return self_attention_forward(c, tp, d, flash, t, p, in.mask, in.cos, in.sin, in.bias,
                                  seed_of(DropoutSite::kAttention), saved);
  });
  if (c.cross_attention) {
    h = sub_block_forward(c, tp, kCrossAttention, p, h, false, false, seed, saved, [&](const at::Tensor& t) {
      return cross_attention_forward(c, tp, d, t, *in.memory, p, in.memory_mask,
                                     seed_of(DropoutSite::kCrossAttention), saved);
    });
  }
  h = sub_block_forward(c, tp, kMlp, p, h, false, true, seed, saved, [&](const at::Tensor& t) {
    ProfilePhase phase("megacore.transformer_layer.mlp");
    return mlp_forward(c, tp, t, p, &saved);
  });
  return {h, saved};
}

/// \brief The backward: [grad_hidden, one gradient per parameter in the table's order, grad_attention_bias,
///        grad_memory] ([0] for an absent one).
std::vector<at::Tensor> backward(const Config& c, const at::Tensor& grad_out, const at::Tensor& x, const Params& p,
                                 const Inputs& in, int64_t seed, const std::vector<at::Tensor>& saved) {
  const TensorParallel tp = tensor_parallel_of(c);
  const int64_t m_local = in.memory.has_value() ? in.memory->size(0) : 0;
  const Dims d = check_inputs(kBackwardOp, c, tp, x, p, /*decoding=*/false, m_local);
  check_mask_and_rotary(kBackwardOp, c, x, d, d.s, d.s, in.mask, in.cos, in.sin);
  check_extras(kBackwardOp, c, x, d, p, in, d.s, d.s, /*memory_required=*/true);
  const bool flash = uses_flash(c, x.device().type(), x.scalar_type(), d.d);
  MEGACORE_CHECK_ARG(static_cast<int64_t>(saved.size()) == kNumSlots, kBackwardOp, "saved has ", saved.size(),
                     " tensors, expected ", static_cast<int64_t>(kNumSlots));
  check_same_dtype_device(kBackwardOp, "grad_out", grad_out, "hidden", x);
  check_same_shape(kBackwardOp, "grad_out", grad_out, "hidden", x);
  auto seed_of = [&](DropoutSite site) { return site_seed(seed, site, site_rank(c, tp, site)); };
  std::vector<at::Tensor> grads(1 + kNumParams + 2);  // [hidden, parameters..., attention_bias, memory]
  auto grad = [&](Param q) -> at::Tensor& { return grads[1 + q]; };
  at::Tensor& g_bias = grads[1 + kNumParams];
  at::Tensor& g_memory = grads[2 + kNumParams];

  // The sub-blocks in reverse; each one's input is the previous one's output (pre-LN: its residual sum; post-LN:
  // the next sub-block's saved input).
  const Slot before_mlp = c.cross_attention ? (c.pre_norm ? kSlot_res_cross : kSlot_mlp_in)
                                            : (c.pre_norm ? kSlot_res1 : kSlot_mlp_in);
  at::Tensor g = sub_block_backward(c, tp, kMlp, p, grad_out.contiguous(), saved[before_mlp], seed, saved, grads,
                                    [&](const at::Tensor& g_y, const at::Tensor& t) {
                                      ProfilePhase phase("megacore.transformer_layer_backward.mlp");
                                      MlpGrads m = mlp_backward(c, tp, g_y, t, p, saved);
                                      grad(k_fc1_weight) = m.fc1_weight;
                                      grad(k_fc1_bias) = m.fc1_bias;
                                      grad(k_fc2_weight) = m.fc2_weight;
                                      return m.x;
                                    });
  if (c.cross_attention) {
    const at::Tensor& before_cross = c.pre_norm ? saved[kSlot_res1] : saved[kSlot_cross_in];
    g = sub_block_backward(c, tp, kCrossAttention, p, g, before_cross, seed, saved, grads,
                           [&](const at::Tensor& g_y, const at::Tensor& t) {
                             CrossAttentionGrads a = cross_attention_backward(
                                 c, tp, d, g_y, t, *in.memory, p, in.memory_mask,
                                 seed_of(DropoutSite::kCrossAttention), saved);
                             grad(k_cross_q_weight) = a.q_weight;
                             grad(k_cross_q_bias) = a.q_bias;
                             grad(k_cross_kv_weight) = a.kv_weight;
                             grad(k_cross_kv_bias) = a.kv_bias;
                             grad(k_cross_proj_weight) = a.proj_weight;
                             g_memory = a.memory;
                             return a.x;
                           });
  }
  g = sub_block_backward(c, tp, kSelfAttention, p, g, x, seed, saved, grads,
                         [&](const at::Tensor& g_y, const at::Tensor& t) {
                           SelfAttentionGrads a = self_attention_backward(
                               c, tp, d, flash, g_y, t, p, in.mask, in.cos, in.sin, in.bias,
                               seed_of(DropoutSite::kAttention), saved);
                           grad(k_qkv_weight) = a.qkv_weight;
                           grad(k_qkv_bias) = a.qkv_bias;
                           grad(k_proj_weight) = a.proj_weight;
                           g_bias = a.bias;
                           return a.x;
                         });
  grads[0] = g;
  // Under sequence parallelism the replicated parameters used on the sequence shard (the norms and the
  // row-parallel biases) got this shard's part of their gradient only. They are summed over the group once
  // per step, with every other such parameter of the model, in one all-reduce
  // (megacore.parallel.sum_sequence_parallel_gradients; the Trainer calls it), as Megatron's
  // finalize_model_grads does: not here, once per layer and micro-batch.
  for (auto& t : grads) {
    if (!t.defined()) t = nothing(x);
  }
  return grads;
}

// ---- decoding -------------------------------------------------------------------------------------------------------

struct Caches {
  at::Tensor keys, values;        // [b, np, capacity, d]
  OptT cross_keys, cross_values;  // [b, np, m, d]
};

/// \brief The layer over n new tokens x [n, b, h] at positions [position, position + n): their keys and values are
///        written into the caches and attention runs over [0, position + n). No dropout; the input is the whole (not
///        sequence-split) new sequence. -> [n, b, h].
at::Tensor decode(const Config& config, const at::Tensor& x, const Params& p, const Inputs& in, const Caches& caches,
                  int64_t position) {
  Config c = config;
  c.training = false;
  c.sequence_parallel = false;
  const TensorParallel tp = tensor_parallel_of(c);
  const int64_t m = c.cross_attention && caches.cross_keys.has_value() ? caches.cross_keys->size(2) : 0;
  const Dims d = check_inputs(kDecodeOp, c, tp, x, p, /*decoding=*/true, m);
  const int64_t n = d.s, end = position + n;
  auto check_cache = [&](const char* name, const at::Tensor& t, int64_t length, const char* what) {
    check_same_dtype_device(kDecodeOp, name, t, "hidden", x);
    MEGACORE_CHECK_ARG(t.dim() == 4 && t.size(0) == d.b && t.size(1) == d.np && t.size(3) == d.d &&
                           (length < 0 || t.size(2) == length) && t.is_contiguous(),
                       kDecodeOp, name, " has shape ", shape_str(t.sizes()), ", expected a contiguous [batch=", d.b,
                       ", heads / tp=", d.np, ", ", what, ", head_dim=", d.d, "]");
  };
  check_cache("key_cache", caches.keys, -1, "capacity");
  check_cache("value_cache", caches.values, caches.keys.size(2), "capacity");
  MEGACORE_CHECK_ARG(position >= 0, kDecodeOp, "position=", position, " must be >= 0");
  MEGACORE_CHECK_ARG(end <= caches.keys.size(2), kDecodeOp, "the cache holds ", caches.keys.size(2),
                     " positions; position=", position, " + ", n, " new tokens need ", end);
  check_mask_and_rotary(kDecodeOp, c, x, d, n, end, in.mask, in.cos, in.sin);
  check_extras(kDecodeOp, c, x, d, p, in, n, end, /*memory_required=*/false);
  if (c.cross_attention) {
    MEGACORE_CHECK_ARG(caches.cross_keys.has_value() && caches.cross_values.has_value(), kDecodeOp,
                       "cross_attention needs cross_key_cache and cross_value_cache");
    check_cache("cross_key_cache", *caches.cross_keys, in.memory ? in.memory->size(0) : m, "memory length");
    check_cache("cross_value_cache", *caches.cross_values, caches.cross_keys->size(2), "memory length");
  } else {
    MEGACORE_CHECK_ARG(!caches.cross_keys.has_value() && !caches.cross_values.has_value(), kDecodeOp,
                       "cross_key_cache and cross_value_cache are only taken with cross_attention=true");
  }

  // The training path's sub-blocks and bias_dropout_add with p = 0: the same sums in the same order, so decoding
  // reproduces the forward's numbers.
  auto block = [&](const SubBlock& sb, const at::Tensor& h, auto body) {
    at::Tensor t = c.pre_norm ? norm(c, h, p, sb.norm_weight, sb.norm_bias, nullptr, sb.mean, sb.rstd) : h;
    at::Tensor res = bias_dropout_add(body(t), p.opt(sb.out_bias), h, 0.0, 0);
    return c.pre_norm ? res : norm(c, res, p, sb.norm_weight, sb.norm_bias, nullptr, sb.mean, sb.rstd);
  };
  at::Tensor h;
  {
    ProfilePhase phase("megacore.transformer_layer_decode.attention");
    h = block(kSelfAttention, x, [&](const at::Tensor& t) {
      return self_attention_decode(c, tp, d, t, p, in.mask, in.cos, in.sin, in.bias, caches.keys, caches.values,
                                   position);
    });
  }
  if (c.cross_attention) {
    ProfilePhase phase("megacore.transformer_layer_decode.cross_attention");
    h = block(kCrossAttention, h, [&](const at::Tensor& t) {
      return cross_attention_decode(c, tp, d, t, in.memory, p, in.memory_mask, *caches.cross_keys,
                                    *caches.cross_values);
    });
  }
  ProfilePhase phase("megacore.transformer_layer_decode.mlp");
  return block(kMlp, h, [&](const at::Tensor& t) { return mlp_forward(c, tp, t, p, nullptr); });
}

// ---- boxed op entry points: the schemas' argument lists ----------------------------------------------------------

void forward_boxed(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  constexpr size_t n = 1 + kNumParams + 8;
  Args a(torch::jit::last(*stack, n));
  const at::Tensor hidden = a.tensor();
  const Params p = a.params();
  const Inputs in{a.optional(), a.optional(), a.optional(), a.optional(), a.optional(), a.optional()};
  const int64_t seed = seed_value(kOp, a.tensor());
  const auto config = config_of(a.string());
  auto [out, saved] = forward(*config, hidden, p, in, seed);
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, std::move(out), std::move(saved));
}

void backward_boxed(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  constexpr size_t n = 2 + kNumParams + 9;
  Args a(torch::jit::last(*stack, n));
  const at::Tensor grad_out = a.tensor();
  const at::Tensor hidden = a.tensor();
  const Params p = a.params();
  const Inputs in{a.optional(), a.optional(), a.optional(), a.optional(), a.optional(), a.optional()};
  const int64_t seed = seed_value(kBackwardOp, a.tensor());
  const std::vector<at::Tensor> saved = a.tensors();
  const auto config = config_of(a.string());
  auto grads = backward(*config, grad_out, hidden, p, in, seed, saved);
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, std::move(grads));
}

void decode_boxed(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  constexpr size_t n = 1 + kNumParams + 12;
  Args a(torch::jit::last(*stack, n));
  const at::Tensor hidden = a.tensor();
  const Params p = a.params();
  const Inputs in{a.optional(), a.optional(), a.optional(), a.optional(), a.optional(), a.optional()};
  Caches caches;
  caches.keys = a.tensor();
  caches.values = a.tensor();
  caches.cross_keys = a.optional();
  caches.cross_values = a.optional();
  const int64_t position = a.integer();
  const auto config = config_of(a.string());
  at::Tensor out = decode(*config, hidden, p, in, caches, position);
  torch::jit::drop(*stack, n);
  torch::jit::push(*stack, std::move(out));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  static const std::string params = param_schema();
  // attention_bias: [b or 1, heads / tp, queries, keys], added to the self-attention scores (config attention_bias);
  // memory [m_local, b, h] and memory_mask bool [b or 1, 1, queries or 1, m]: cross-attention (config cross_attention).
  static const std::string kExtras =
      "Tensor? attention_mask, Tensor? rotary_cos, Tensor? rotary_sin, Tensor? attention_bias, Tensor? memory, "
      "Tensor? memory_mask";
  // hidden [s_local, b, h] -> (out [s_local, b, h], saved): saved holds what backward needs, in the slot order
  // of config.h. Parameters are this rank's shards; config is the layer's configuration string
  // (megacore._C.transformer_layer_config builds it); seed: int64 CPU tensor of one element.
  static const std::string forward_schema = "transformer_layer(Tensor hidden, " + params +
                                            ", " + kExtras + ", Tensor seed, str config) -> (Tensor, Tensor[])";
  // -> [grad_hidden, one gradient per parameter in the order above, grad_attention_bias, grad_memory] ([0] for a
  // None one).
  static const std::string backward_schema = "transformer_layer_backward(Tensor grad_out, Tensor hidden, " + params +
                                             ", " + kExtras + ", Tensor seed, Tensor[] saved, str config) -> Tensor[]";
  // hidden [n, b, h], the new tokens at [position, position + n) -> [n, b, h]; writes their keys and values
  // into the caches [b, heads / tp, capacity, head_dim]; with memory, its keys and values into the cross caches
  // [b, heads / tp, m, head_dim] (without, they are read).
  static const std::string decode_schema = "transformer_layer_decode(Tensor hidden, " + params +
                                           ", " + kExtras + ", Tensor(a!) key_cache, Tensor(b!) value_cache, "
                                           "Tensor(c!)? cross_key_cache, Tensor(d!)? cross_value_cache, SymInt position, "
                                           "str config) -> Tensor";
  ops::define_op(m, forward_schema.c_str());
  ops::define_op(m, backward_schema.c_str());
  ops::define_op(m, decode_schema.c_str());
}

TORCH_LIBRARY_IMPL(megacore, CompositeExplicitAutograd, m) {
  m.impl("transformer_layer", torch::CppFunction::makeFromBoxedFunction<&forward_boxed>());
  m.impl("transformer_layer_backward", torch::CppFunction::makeFromBoxedFunction<&backward_boxed>());
  m.impl("transformer_layer_decode", torch::CppFunction::makeFromBoxedFunction<&decode_boxed>());
}

// Decoding is inference: its output has a grad_fn that raises "not implemented" if anyone backpropagates.
TORCH_LIBRARY_IMPL(megacore, Autograd, m) {
  m.impl("transformer_layer_decode", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace megacore::transformer
