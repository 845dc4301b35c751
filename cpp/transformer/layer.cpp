// The transformer layer as two torch ops: megacore::transformer_layer (forward) and
// megacore::transformer_layer_backward. Schemas in cpp/registration.cpp; autograd, the fake kernel and the
// nn.Module in python/megacore/transformer/.
//
// One implementation for every device (CompositeExplicitAutograd): the GEMMs are ATen's, the fused pieces
// are megacore's own ops called through the dispatcher (so CPU and CUDA kernels are picked per device),
// and the tensor-parallel communication is megacore's C++ collectives on the group named `group_name`.
//
//   pre-LN  (GPT):  h = x + drop(proj(attn(norm1(x))))        out = h + drop(fc2(gelu(fc1(norm2(h)))))
//   post-LN (BERT): h = norm1(x + drop(proj(attn(x))))        out = norm2(h + drop(fc2(gelu(fc1(h)))))
//
// Shapes: x is [s_local, b, h] (s_local = s / tp with sequence parallelism, else s); the GEMMs see the
// whole sequence [s, b, ...]; each rank owns np = heads / tp heads (head_dim d) and ffn / tp MLP columns.
// Tensor-parallel regions (Megatron's f/g conjugate pairs) are entered before the column-parallel GEMMs
// (forward: identity, or all-gather of the sequence; backward: all-reduce, or reduce-scatter) and left
// after the row-parallel GEMMs (forward: all-reduce, or reduce-scatter; backward: identity, or all-gather).
//
// The forward returns the tensors backward needs as a fixed list of slots (Saved below), with empty [0]
// tensors in the slots a configuration does not use.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "common/profiling.h"
#include "ops/op.h"

namespace megacore::transformer {
namespace {

constexpr const char* kOp = "transformer_layer";

enum class Norm { kLayerNorm, kRmsNorm };
enum class Mask { kCausal, kSlidingWindow, kPadding, kNone };
enum class Backend { kAuto, kFusedSoftmax, kFlash };

/// \brief The layer's configuration, parsed and checked once from the op's scalar arguments.
struct Config {
  int64_t num_heads = 0;  // over the whole tensor-parallel group
  Norm norm = Norm::kLayerNorm;
  double eps = 1e-5;
  bool pre_norm = true;
  Mask mask = Mask::kCausal;
  std::optional<int64_t> window;
  std::string approximate;  // bias_gelu's: "none" (erf GeLU) or "tanh"
  double attention_dropout = 0.0, hidden_dropout = 0.0;
  bool sequence_parallel = false, recompute_attention = false, training = true;
  Backend backend = Backend::kAuto;
  std::string group_name;  // "" = no tensor parallelism
  int64_t tp_size = 1, tp_rank = 0;

  double attention_p() const { return training ? attention_dropout : 0.0; }
  double hidden_p() const { return training ? hidden_dropout : 0.0; }
};

/// \brief Parses the op's scalar arguments; resolves the tensor-parallel group for its size and rank.
Config parse_config(int64_t num_heads, c10::string_view normalization, double norm_eps, bool pre_norm,
                    c10::string_view mask_kind, std::optional<int64_t> window, c10::string_view activation,
                    double attention_dropout, double hidden_dropout, bool sequence_parallel,
                    bool recompute_attention, c10::string_view attention_backend, c10::string_view group_name,
                    bool training) {
  Config c;
  MEGACORE_CHECK_ARG(num_heads >= 1, kOp, "num_heads=", num_heads, " must be >= 1");
  c.num_heads = num_heads;
  if (normalization == "layernorm") {
    c.norm = Norm::kLayerNorm;
  } else if (normalization == "rmsnorm") {
    c.norm = Norm::kRmsNorm;
  } else {
    MEGACORE_CHECK_ARG(false, kOp, "normalization '", normalization, "' is not one of layernorm, rmsnorm");
  }
  MEGACORE_CHECK_ARG(norm_eps > 0, kOp, "norm_eps=", norm_eps, " must be > 0");
  c.eps = norm_eps;
  c.pre_norm = pre_norm;
  if (mask_kind == "causal") {
    c.mask = Mask::kCausal;
  } else if (mask_kind == "sliding_window") {
    c.mask = Mask::kSlidingWindow;
  } else if (mask_kind == "padding") {
    c.mask = Mask::kPadding;
  } else if (mask_kind == "none") {
    c.mask = Mask::kNone;
  } else {
    MEGACORE_CHECK_ARG(false, kOp, "mask_kind '", mask_kind, "' is not one of causal, sliding_window, padding, none");
  }
  MEGACORE_CHECK_ARG((c.mask == Mask::kSlidingWindow) == window.has_value(), kOp,
                     "window must be given exactly when mask_kind is sliding_window (mask_kind '", mask_kind,
                     "', window ", window.has_value() ? std::to_string(*window) : std::string("None"), ")");
  MEGACORE_CHECK_ARG(!window.has_value() || *window >= 1, kOp, "window=", window.value_or(0), " must be >= 1");
  c.window = window;
  if (activation == "gelu") {
    c.approximate = "none";
  } else if (activation == "gelu_tanh") {
    c.approximate = "tanh";
  } else {
    MEGACORE_CHECK_ARG(false, kOp, "activation '", activation, "' is not one of gelu, gelu_tanh");
  }
  check_probability(kOp, "attention_dropout", attention_dropout);
  check_probability(kOp, "hidden_dropout", hidden_dropout);
  c.attention_dropout = attention_dropout;
  c.hidden_dropout = hidden_dropout;
  c.sequence_parallel = sequence_parallel;
  c.recompute_attention = recompute_attention;
  c.training = training;
  if (attention_backend == "auto") {
    c.backend = Backend::kAuto;
  } else if (attention_backend == "fused_softmax") {
    c.backend = Backend::kFusedSoftmax;
  } else if (attention_backend == "flash") {
    c.backend = Backend::kFlash;
  } else {
    MEGACORE_CHECK_ARG(false, kOp, "attention_backend '", attention_backend,
                       "' is not one of auto, fused_softmax, flash");
  }
  c.group_name = std::string(group_name);
  if (!c.group_name.empty()) {
    c10::intrusive_ptr<c10d::ProcessGroup> pg;
    try {
      pg = c10d::resolve_process_group(c.group_name);
    } catch (const c10::Error&) {
      MEGACORE_CHECK_ARG(false, kOp, "group_name '", c.group_name, "' names no registered process group");
    }
    c.tp_size = pg->getSize();
    c.tp_rank = pg->getRank();
  }
  MEGACORE_CHECK_ARG(!sequence_parallel || !c.group_name.empty(), kOp,
                     "sequence_parallel needs a tensor-parallel group (group_name is empty)");
  MEGACORE_CHECK_ARG(num_heads % c.tp_size == 0, kOp, "num_heads=", num_heads,
                     " is not divisible by the tensor-parallel size ", c.tp_size);
  return c;
}

/// \brief The layer's parameters (this rank's shards); optional ones may be absent.
struct Params {
  std::optional<at::Tensor> norm1_weight, norm1_bias;
  at::Tensor qkv_weight;  // [np * 3 * d, h], rows ordered (head, {q, k, v}, d) as in Megatron
  std::optional<at::Tensor> qkv_bias;
  at::Tensor proj_weight;  // [h, np * d]
  std::optional<at::Tensor> proj_bias;
  std::optional<at::Tensor> norm2_weight, norm2_bias;
  at::Tensor fc1_weight;  // [f, h]
  std::optional<at::Tensor> fc1_bias;
  at::Tensor fc2_weight;  // [h, f]
  std::optional<at::Tensor> fc2_bias;
};

/// \brief Sizes derived from the input and the weights.
struct Dims {
  int64_t s_local, s, b, h, np, d, f;
};

/// \brief An optional tensor argument must match `like`'s dtype/device and be 1-D of length `n`.
void check_optional_vector(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& like, int64_t n,
                           const char* what) {
  if (!t.has_value()) return;
  check_same_dtype_device(kOp, name, *t, "hidden", like);
  check_vector(kOp, name, *t, n, what);
}

/// \brief A weight must match `hidden`'s dtype/device and be [rows, cols].
void check_matrix(const char* name, const at::Tensor& w, const at::Tensor& hidden, int64_t rows, int64_t cols,
                  const char* what) {
  MEGACORE_CHECK_ARG(w.defined(), kOp, name, " is undefined");
  check_same_dtype_device(kOp, name, w, "hidden", hidden);
  MEGACORE_CHECK_ARG(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, kOp, name, " has shape ",
                     shape_str(w.sizes()), ", expected [", rows, ", ", cols, "] (", what, ")");
}

/// \brief Checks every tensor argument; returns the sizes.
Dims check_inputs(const Config& c, const at::Tensor& hidden, const Params& p, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin) {
  check_float_tensor(kOp, "hidden", hidden);
  MEGACORE_CHECK_ARG(hidden.dim() == 3, kOp, "hidden has shape ", shape_str(hidden.sizes()),
                     ", expected [seq, batch, hidden]");
  Dims d{};
  d.s_local = hidden.size(0);
  d.b = hidden.size(1);
  d.h = hidden.size(2);
  d.s = c.sequence_parallel ? d.s_local * c.tp_size : d.s_local;
  MEGACORE_CHECK_ARG(d.h % c.num_heads == 0, kOp, "hidden size ", d.h, " is not divisible by num_heads=", c.num_heads);
  d.np = c.num_heads / c.tp_size;
  d.d = d.h / c.num_heads;
  MEGACORE_CHECK_ARG(p.fc1_weight.defined() && p.fc1_weight.dim() == 2, kOp, "fc1_weight must be a [ffn / tp, hidden] matrix");
  d.f = p.fc1_weight.size(0);
  check_optional_vector("attention_norm_weight", p.norm1_weight, hidden, d.h, "the hidden size");
  check_optional_vector("attention_norm_bias", p.norm1_bias, hidden, d.h, "the hidden size");
  check_optional_vector("mlp_norm_weight", p.norm2_weight, hidden, d.h, "the hidden size");
  check_optional_vector("mlp_norm_bias", p.norm2_bias, hidden, d.h, "the hidden size");
  MEGACORE_CHECK_ARG(c.norm == Norm::kLayerNorm || (!p.norm1_bias.has_value() && !p.norm2_bias.has_value()), kOp,
                     "rmsnorm takes no norm bias");
  check_matrix("qkv_weight", p.qkv_weight, hidden, 3 * d.np * d.d, d.h, "3 * heads / tp * head_dim, hidden");
  check_optional_vector("qkv_bias", p.qkv_bias, hidden, 3 * d.np * d.d, "3 * heads / tp * head_dim");
  check_matrix("proj_weight", p.proj_weight, hidden, d.h, d.np * d.d, "hidden, heads / tp * head_dim");
  check_optional_vector("proj_bias", p.proj_bias, hidden, d.h, "the hidden size");
  check_matrix("fc1_weight", p.fc1_weight, hidden, d.f, d.h, "ffn / tp, hidden");
  check_optional_vector("fc1_bias", p.fc1_bias, hidden, d.f, "ffn / tp");
  check_matrix("fc2_weight", p.fc2_weight, hidden, d.h, d.f, "hidden, ffn / tp");
  check_optional_vector("fc2_bias", p.fc2_bias, hidden, d.h, "the hidden size");
  if (c.mask == Mask::kPadding) {
    MEGACORE_CHECK_ARG(mask.has_value(), kOp, "mask_kind 'padding' needs attention_mask");
    const at::Tensor& m = *mask;
    MEGACORE_CHECK_TYPE(m.scalar_type() == at::kBool, kOp, "attention_mask has dtype ", m.scalar_type(),
                        ", expected Bool (True = masked out)");
    check_same_device(kOp, "attention_mask", m, "hidden", hidden);
    MEGACORE_CHECK_ARG(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == d.b) && m.size(1) == 1 &&
                           (m.size(2) == 1 || m.size(2) == d.s) && m.size(3) == d.s,
                       kOp, "attention_mask has shape ", shape_str(m.sizes()), ", expected [batch or 1, 1, ",
                       "seq or 1, seq] = [", d.b, ", 1, ", d.s, ", ", d.s, "]");
  } else {
    MEGACORE_CHECK_ARG(!mask.has_value(), kOp, "attention_mask is only taken with mask_kind 'padding'");
  }
  MEGACORE_CHECK_ARG(cos.has_value() == sin.has_value(), kOp, "rotary_cos and rotary_sin go together");
  if (cos.has_value()) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"rotary_cos", *cos}, {"rotary_sin", *sin}}) {
      check_float_tensor(kOp, name, t);
      check_same_device(kOp, name, t, "hidden", hidden);
      MEGACORE_CHECK_ARG(t.dim() == 2 && t.size(0) == d.s && t.size(1) % 2 == 0 && t.size(1) <= d.d, kOp, name,
                         " has shape ", shape_str(t.sizes()), ", expected [seq=", d.s,
                         ", rotary_dim] with rotary_dim even and <= head_dim=", d.d);
    }
  }
  return d;
}

// ---- megacore's fused ops, called through the dispatcher (CPU or CUDA kernel by device) ------------------

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using OptT = std::optional<at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor empty_like_nothing(const at::Tensor& like) { return at::empty({0}, like.options()); }

/// \brief The norm's output and its statistics (mean is an empty tensor for rmsnorm).
T3 norm_forward(const Config& c, const at::Tensor& x, const OptT& w, const OptT& b) {
  if (c.norm == Norm::kLayerNorm) {
    static auto op = find_op<T3(const at::Tensor&, const OptT&, const OptT&, double)>("megacore::layer_norm");
    return op.call(x, w, b, c.eps);
  }
  static auto op = find_op<T2(const at::Tensor&, const OptT&, double)>("megacore::rms_norm");
  auto [out, rstd] = op.call(x, w, c.eps);
  return {out, empty_like_nothing(rstd), rstd};
}

/// \brief -> (grad_x, grad_weight, grad_bias), the parameter gradients undefined when absent.
T3 norm_backward(const Config& c, const at::Tensor& g, const at::Tensor& x, const OptT& w, const OptT& b,
                 const at::Tensor& mean, const at::Tensor& rstd) {
  at::Tensor gx, gw, gb;
  if (c.norm == Norm::kLayerNorm) {
    static auto op = find_op<T3(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
                                const at::Tensor&, bool)>("megacore::layer_norm_backward");
    std::tie(gx, gw, gb) = op.call(g, x, w, mean, rstd, b.has_value());
  } else {
    static auto op = find_op<T2(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&)>(
        "megacore::rms_norm_backward");
    std::tie(gx, gw) = op.call(g, x, w, rstd);
  }
  return {gx, w.has_value() ? gw : at::Tensor(), b.has_value() ? gb : at::Tensor()};
}

at::Tensor bias_dropout_add(const at::Tensor& x, const OptT& bias, const at::Tensor& residual, double p,
                            const at::Tensor& seed) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const OptT&, const at::Tensor&, double, const at::Tensor&)>(
      "megacore::bias_dropout_add");
  return op.call(x, bias, residual, p, seed);
}

/// \brief -> (grad_x, grad_bias or undefined).
T2 bias_dropout_add_backward(const at::Tensor& g, double p, const at::Tensor& seed, bool has_bias) {
  static auto op = find_op<T2(const at::Tensor&, double, const at::Tensor&, bool)>(
      "megacore::bias_dropout_add_backward");
  auto [gx, gb] = op.call(g, p, seed, has_bias);
  return {gx, has_bias ? gb : at::Tensor()};
}

at::Tensor bias_gelu(const Config& c, const at::Tensor& x, const OptT& bias) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const OptT&, c10::string_view)>("megacore::bias_gelu");
  return op.call(x, bias, c.approximate);
}

T2 bias_gelu_backward(const Config& c, const at::Tensor& g, const at::Tensor& x, const OptT& bias) {
  static auto op = find_op<T2(const at::Tensor&, const at::Tensor&, const OptT&, c10::string_view)>(
      "megacore::bias_gelu_backward");
  auto [gx, gb] = op.call(g, x, bias, c.approximate);
  return {gx, bias.has_value() ? gb : at::Tensor()};
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
  static auto fwd = find_op<Sig>("megacore::apply_rotary_emb");
  static auto bwd = find_op<Sig>("megacore::apply_rotary_emb_backward");
  return backward ? bwd.call(x, cos, sin) : fwd.call(x, cos, sin);
}

/// \brief softmax(scale * scores) with the configured mask; scores [b, np, s, s].
at::Tensor masked_softmax(const Config& c, const at::Tensor& scores, const OptT& mask, double scale) {
  if (c.mask == Mask::kCausal || c.mask == Mask::kSlidingWindow) {
    static auto op = find_op<at::Tensor(const at::Tensor&, double, std::optional<int64_t>)>(
        "megacore::scaled_causal_softmax");
    return op.call(scores, scale, c.window);
  }
  static auto op = find_op<at::Tensor(const at::Tensor&, const OptT&, double)>("megacore::scaled_masked_softmax");
  return op.call(scores, c.mask == Mask::kPadding ? mask : OptT(), scale);
}

at::Tensor softmax_backward(const at::Tensor& g, const at::Tensor& probs, double scale) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("megacore::scaled_softmax_backward");
  return op.call(g, probs, scale);
}

// ---- tensor-parallel communication --------------------------------------------------------------------

at::Tensor all_reduce(const Config& c, const at::Tensor& x) {
  if (c.tp_size == 1) return x;
  static auto op = find_op<at::Tensor(const at::Tensor&, const std::string&, const std::string&)>("megacore::all_reduce");
  return op.call(x, c.group_name, "sum");
}

/// \brief [n, ...] -> [tp * n, ...]
at::Tensor gather_sequence(const Config& c, const at::Tensor& x) {
  if (c.tp_size == 1) return x;
  static auto op = find_op<at::Tensor(const at::Tensor&, int64_t, const std::string&)>("megacore::all_gather");
  return op.call(x, 0, c.group_name);
}

/// \brief [tp * n, ...] -> [n, ...], summed over ranks.
at::Tensor reduce_scatter_sequence(const Config& c, const at::Tensor& x) {
  if (c.tp_size == 1) return x;
  static auto op = find_op<at::Tensor(const at::Tensor&, int64_t, const std::string&)>("megacore::reduce_scatter");
  return op.call(x, 0, c.group_name);
}

/// \brief Into the tensor-parallel region, before a column-parallel GEMM: [s_local, b, h] -> [s, b, h].
at::Tensor enter_region(const Config& c, const at::Tensor& x) {
  return c.sequence_parallel ? gather_sequence(c, x) : x;
}

/// \brief Backward of enter_region: the gradient of the GEMM input summed over ranks, [s, b, h] -> [s_local, b, h].
at::Tensor enter_region_backward(const Config& c, const at::Tensor& g) {
  return c.sequence_parallel ? reduce_scatter_sequence(c, g) : all_reduce(c, g);
}

/// \brief Out of the region, after a row-parallel GEMM: partial sums [s, b, h] -> [s_local, b, h].
at::Tensor exit_region(const Config& c, const at::Tensor& x) {
  return c.sequence_parallel ? reduce_scatter_sequence(c, x) : all_reduce(c, x);
}

/// \brief Backward of exit_region: [s_local, b, h] -> [s, b, h].
at::Tensor exit_region_backward(const Config& c, const at::Tensor& g) {
  return c.sequence_parallel ? gather_sequence(c, g) : g;
}

// ---- dropout seeds ----------------------------------------------------------------------------------------

/// \brief The seed of one dropout site: seed + (site * 65536 + rank) * 0x9E3779B97F4A7C15 (mod 2^64).
/// Sites: 0 = attention probabilities (rank = tensor-parallel rank: each rank owns different heads),
/// 1 and 2 = the residual dropouts after attention and MLP (rank = tensor-parallel rank under sequence
/// parallelism, where each rank holds a different part of the sequence; else 0: the hidden state is
/// replicated and every rank must drop the same elements).
at::Tensor site_seed(const at::Tensor& seed, int64_t site, int64_t rank) {
  const uint64_t base = static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
  const uint64_t mixed = base + (static_cast<uint64_t>(site) * 65536u + static_cast<uint64_t>(rank)) * 0x9E3779B97F4A7C15ull;
  return at::scalar_tensor(static_cast<int64_t>(mixed), at::TensorOptions().dtype(at::kLong));
}

int64_t residual_rank(const Config& c) { return c.sequence_parallel ? c.tp_rank : 0; }

// ---- core attention ---------------------------------------------------------------------------------------

/// \brief Whether this call uses PyTorch's flash attention kernel instead of GEMM + fused softmax: only
/// for causal or unmasked attention; on CPU without attention dropout (the CPU kernel has none), on CUDA
/// for fp16/bf16 with head_dim a multiple of 8 up to 256. attention_backend='flash' makes it mandatory.
bool use_flash(const Config& c, const at::Tensor& hidden, int64_t head_dim) {
  if (c.backend == Backend::kFusedSoftmax) return false;
  const bool mask_ok = c.mask == Mask::kCausal || c.mask == Mask::kNone;
  bool ok = false;
  const char* why = "";
  if (!mask_ok) {
    why = "it handles only mask_kind causal or none";
  } else if (hidden.is_cpu()) {
    ok = c.attention_p() == 0.0;
    why = "on CPU it has no attention dropout";
  } else if (hidden.is_cuda()) {
    const auto t = hidden.scalar_type();
    ok = (t == at::kHalf || t == at::kBFloat16) && head_dim % 8 == 0 && head_dim <= 256;
    why = "on CUDA it needs fp16/bf16 and head_dim a multiple of 8, at most 256";
  } else {
    why = "it runs on CPU and CUDA only";
  }
  MEGACORE_CHECK_ARG(ok || c.backend != Backend::kFlash, kOp, "attention_backend 'flash' cannot run here: ", why);
  return ok;
}

/// \brief The slots of the saved-for-backward list (see python/megacore/transformer/layer.py's fake kernel).
enum Slot : int64_t {
  kNorm1Mean, kNorm1Rstd, kAttnIn, kQ, kK, kV, kProbs, kProbsDropped, kContext, kLse, kRngState, kRngUnused,
  kRes1, kNorm2Mean, kNorm2Rstd, kMlpIn, kFc1Out, kGeluOut, kRes2, kNumSlots
};

/// \brief q, k, v of this rank's heads, each [b, np, s, d] contiguous, rotary applied to q and k.
std::tuple<at::Tensor, at::Tensor, at::Tensor> split_heads(const Dims& d, const at::Tensor& qkv, const OptT& cos,
                                                           const OptT& sin) {
  at::Tensor parts = qkv.view({d.s, d.b, d.np, 3, d.d});  // Megatron's per-head (q, k, v) grouping
  at::Tensor q = parts.select(3, 0), k = parts.select(3, 1), v = parts.select(3, 2);  // [s, b, np, d]
  if (cos.has_value()) {
    q = rotary(q, *cos, *sin, /*backward=*/false);
    k = rotary(k, *cos, *sin, /*backward=*/false);
  }
  auto to_bnsd = [](const at::Tensor& t) { return t.permute({1, 2, 0, 3}).contiguous(); };
  return {to_bnsd(q), to_bnsd(k), to_bnsd(v)};
}

/// \brief Gradients of q, k, v ([b, np, s, d] each, before rotary undone) into the QKV GEMM's output layout.
at::Tensor merge_head_grads(const Dims& d, const at::Tensor& gq, const at::Tensor& gk, const at::Tensor& gv,
                            const OptT& cos, const OptT& sin) {
  at::Tensor g = at::empty({d.s, d.b, d.np, 3, d.d}, gq.options());
  const at::Tensor* grads[3] = {&gq, &gk, &gv};
  for (int64_t i = 0; i < 3; ++i) {
    at::Tensor gi = grads[i]->permute({2, 0, 1, 3});  // [s, b, np, d]
    if (cos.has_value() && i < 2) gi = rotary(gi, *cos, *sin, /*backward=*/true);
    g.select(3, i).copy_(gi);
  }
  return g.view({d.s, d.b, 3 * d.np * d.d});
}

/// \brief The attention probabilities after dropout (a fresh tensor only when p > 0). bias_dropout_add's
/// backward is exactly `probs * mask / (1 - p)` with the mask its forward draws from `seed`: one pass,
/// without the zero residual the forward op would need.
at::Tensor dropped(const at::Tensor& probs, double p, const at::Tensor& seed) {
  if (p == 0.0) return probs;
  return std::get<0>(bias_dropout_add_backward(probs, p, seed, /*has_bias=*/false));
}

/// \brief Forward core attention; fills the context [s, b, np * d] and the slots backward needs.
void attention_forward(const Config& c, const Dims& d, bool flash, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const OptT& mask, const at::Tensor& seed, std::vector<at::Tensor>& saved) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(d.d));
  const bool causal = c.mask == Mask::kCausal;
  at::Tensor context;  // [b, np, s, d]
  if (flash && q.is_cpu()) {
    auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, std::nullopt, scale);
    context = out;
    saved[kLse] = lse;
  } else if (flash) {
    auto r = at::_scaled_dot_product_flash_attention(q, k, v, c.attention_p(), causal, false, scale);
    context = std::get<0>(r);
    saved[kLse] = std::get<1>(r);
    // Philox state of the dropout (seed, offset); undefined when there is none.
    if (std::get<6>(r).defined()) saved[kRngState] = std::get<6>(r);
    if (std::get<7>(r).defined()) saved[kRngUnused] = std::get<7>(r);
  } else {
    at::Tensor probs = masked_softmax(c, at::matmul(q, k.transpose(-2, -1)), mask, scale);  // [b, np, s, s]
    at::Tensor probs_dropped = dropped(probs, c.attention_p(), seed);
    context = at::matmul(probs_dropped, v);
    if (!c.recompute_attention) {  // keep both: backward then needs no pass over [b, np, s, s] to rebuild them
      saved[kProbs] = probs;
      if (c.attention_p() > 0.0) saved[kProbsDropped] = probs_dropped;
    }
  }
  saved[kContext] = context.permute({2, 0, 1, 3}).reshape({d.s, d.b, d.np * d.d});
}

/// \brief Backward core attention: (grad_q, grad_k, grad_v), each [b, np, s, d].
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const Config& c, const Dims& d, bool flash,
                                                                  const at::Tensor& g_context,
                                                                  const std::vector<at::Tensor>& saved,
                                                                  const OptT& mask, const at::Tensor& seed) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(d.d));
  const bool causal = c.mask == Mask::kCausal;
  const at::Tensor &q = saved[kQ], &k = saved[kK], &v = saved[kV];
  at::Tensor g = g_context.view({d.s, d.b, d.np, d.d}).permute({1, 2, 0, 3});  // [b, np, s, d]
  if (flash) {
    at::Tensor out = saved[kContext].view({d.s, d.b, d.np, d.d}).permute({1, 2, 0, 3});
    if (q.is_cpu()) {
      return at::_scaled_dot_product_flash_attention_for_cpu_backward(g.contiguous(), q, k, v, out, saved[kLse], 0.0,
                                                                      causal, std::nullopt, scale);
    }
    auto or_undefined = [](const at::Tensor& t) { return t.numel() ? t : at::Tensor(); };
    return at::_scaled_dot_product_flash_attention_backward(g.contiguous(), q, k, v, out, saved[kLse], at::Tensor(),
                                                           at::Tensor(), d.s, d.s, c.attention_p(), causal,
                                                           or_undefined(saved[kRngState]),
                                                           or_undefined(saved[kRngUnused]), scale);
  }
  // Selective recomputation: the probabilities were not kept, rebuild them from q and k.
  at::Tensor probs = c.recompute_attention ? masked_softmax(c, at::matmul(q, k.transpose(-2, -1)), mask, scale)
                                           : saved[kProbs];
  const double p = c.attention_p();
  const bool kept = !c.recompute_attention && p > 0.0;
  at::Tensor g_v = at::matmul((kept ? saved[kProbsDropped] : dropped(probs, p, seed)).transpose(-2, -1), g);
  at::Tensor g_probs = at::matmul(g, v.transpose(-2, -1));  // [b, np, s, s]
  if (p > 0.0) g_probs = std::get<0>(bias_dropout_add_backward(g_probs, p, seed, false));
  at::Tensor g_scores = softmax_backward(g_probs, probs, scale);
  at::Tensor g_q = at::matmul(g_scores, k);
  at::Tensor g_k = at::matmul(g_scores.transpose(-2, -1), q);
  return {g_q, g_k, g_v};
}

// ---- GEMM helpers on [s, b, in] activations ---------------------------------------------------------------

/// \brief x [..., in] @ w[out, in]^T -> [..., out] (no bias).
at::Tensor matmul_t(const at::Tensor& x, const at::Tensor& w) { return at::linear(x, w); }

/// \brief Gradients of y = x @ w^T: grad_x [..., in] and grad_w [out, in] (= g^T x over all rows).
T2 linear_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w) {
  at::Tensor g2 = g.reshape({-1, g.size(-1)});
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  return {at::matmul(g, w), at::mm(g2.t(), x2)};
}

/// \brief The sum of g over every row (a bias gradient), in g's dtype with accumulation in fp32.
at::Tensor bias_grad(const at::Tensor& g) {
  return g.reshape({-1, g.size(-1)}).sum(0, /*keepdim=*/false, at::toOpMathType(g.scalar_type())).to(g.scalar_type());
}

// ---- the ops ----------------------------------------------------------------------------------------------

/// \brief The forward: (output [s_local, b, h], saved slots).
std::tuple<at::Tensor, std::vector<at::Tensor>> forward(const Config& c, const at::Tensor& x, const Params& p,
                                                        const OptT& mask, const OptT& cos, const OptT& sin,
                                                        const at::Tensor& seed) {
  const Dims d = check_inputs(c, x, p, mask, cos, sin);
  const bool flash = use_flash(c, x, d.d);
  std::vector<at::Tensor> saved(kNumSlots);  // every slot its own tensor: an op's outputs may not alias
  for (auto& t : saved) t = empty_like_nothing(x);
  auto keep_stats = [&](const T3& n, Slot mean, Slot rstd) {
    saved[mean] = std::get<1>(n);
    saved[rstd] = std::get<2>(n);
    return std::get<0>(n);
  };

  // Attention block. Each phase is a ProfilePhase scope, so Nsight and torch.profiler show it by name.
  at::Tensor attn_in = x;  // [s_local, b, h]
  if (c.pre_norm) {
    ProfilePhase phase("megacore.transformer_layer.attention_norm");
    attn_in = saved[kAttnIn] = keep_stats(norm_forward(c, x, p.norm1_weight, p.norm1_bias), kNorm1Mean, kNorm1Rstd);
  }
  at::Tensor q, k, v;  // each [b, np, s, d]
  {
    ProfilePhase phase("megacore.transformer_layer.qkv");
    at::Tensor qkv = at::linear(enter_region(c, attn_in), p.qkv_weight, p.qkv_bias);  // [s, b, 3 * np * d]
    std::tie(q, k, v) = split_heads(d, qkv, cos, sin);
    saved[kQ] = q;
    saved[kK] = k;
    saved[kV] = v;
  }
  {
    ProfilePhase phase("megacore.transformer_layer.attention");
    attention_forward(c, d, flash, q, k, v, mask, site_seed(seed, 0, c.tp_rank), saved);
  }
  at::Tensor res1;
  {
    ProfilePhase phase("megacore.transformer_layer.proj");
    at::Tensor attn = exit_region(c, matmul_t(saved[kContext], p.proj_weight));  // [s_local, b, h]
    res1 = saved[kRes1] = bias_dropout_add(attn, p.proj_bias, x, c.hidden_p(), site_seed(seed, 1, residual_rank(c)));
  }

  // MLP block. Post-LN normalizes after the residual with the attention norm's weights.
  at::Tensor mlp_in;
  {
    ProfilePhase phase(c.pre_norm ? "megacore.transformer_layer.mlp_norm"
                                  : "megacore.transformer_layer.attention_norm");
    mlp_in = saved[kMlpIn] = keep_stats(norm_forward(c, res1, c.pre_norm ? p.norm2_weight : p.norm1_weight,
                                                     c.pre_norm ? p.norm2_bias : p.norm1_bias),
                                        c.pre_norm ? kNorm2Mean : kNorm1Mean, c.pre_norm ? kNorm2Rstd : kNorm1Rstd);
  }
  at::Tensor out;
  {
    ProfilePhase phase("megacore.transformer_layer.mlp");
    at::Tensor fc1 = saved[kFc1Out] = matmul_t(enter_region(c, mlp_in), p.fc1_weight);  // [s, b, f]
    at::Tensor act = saved[kGeluOut] = bias_gelu(c, fc1, p.fc1_bias);
    at::Tensor mlp = exit_region(c, matmul_t(act, p.fc2_weight));  // [s_local, b, h]
    out = bias_dropout_add(mlp, p.fc2_bias, c.pre_norm ? res1 : mlp_in, c.hidden_p(),
                           site_seed(seed, 2, residual_rank(c)));
  }
  if (!c.pre_norm) {
    ProfilePhase phase("megacore.transformer_layer.mlp_norm");
    saved[kRes2] = out;
    out = keep_stats(norm_forward(c, out, p.norm2_weight, p.norm2_bias), kNorm2Mean, kNorm2Rstd);
  }
  return {out, saved};
}

/// \brief The backward: [grad_hidden, then one gradient per parameter in the schema's order (empty for None)].
std::vector<at::Tensor> backward(const Config& c, const at::Tensor& grad_out, const at::Tensor& x, const Params& p,
                                 const OptT& mask, const OptT& cos, const OptT& sin, const at::Tensor& seed,
                                 at::TensorList saved_list) {
  const Dims d = check_inputs(c, x, p, mask, cos, sin);
  const bool flash = use_flash(c, x, d.d);
  MEGACORE_CHECK_ARG(static_cast<int64_t>(saved_list.size()) == kNumSlots, "transformer_layer_backward", "saved has ",
                     saved_list.size(), " tensors, expected ", static_cast<int64_t>(kNumSlots));
  check_same_dtype_device("transformer_layer_backward", "grad_out", grad_out, "hidden", x);
  check_same_shape("transformer_layer_backward", "grad_out", grad_out, "hidden", x);
  const std::vector<at::Tensor> saved(saved_list.begin(), saved_list.end());
  const at::Tensor& res1 = saved[kRes1];
  const at::Tensor& mlp_in = saved[kMlpIn];

  // The forward's phases in reverse, under the same names in megacore.transformer_layer_backward.
  at::Tensor g_n1w, g_n1b, g_n2w, g_n2b;  // norm parameter gradients
  at::Tensor g = grad_out.contiguous();  // [s_local, b, h]
  if (!c.pre_norm) {
    ProfilePhase phase("megacore.transformer_layer_backward.mlp_norm");
    std::tie(g, g_n2w, g_n2b) = norm_backward(c, g, saved[kRes2], p.norm2_weight, p.norm2_bias, saved[kNorm2Mean],
                                              saved[kNorm2Rstd]);
  }
  at::Tensor g_mlp_in, g_fc2b, g_fc2w, g_fc1b, g_fc1w;
  {
    ProfilePhase phase("megacore.transformer_layer_backward.mlp");
    // out = bias_dropout_add(mlp, fc2_bias, residual): the residual's gradient is g itself.
    at::Tensor g_mlp;
    std::tie(g_mlp, g_fc2b) = bias_dropout_add_backward(g, c.hidden_p(), site_seed(seed, 2, residual_rank(c)),
                                                        p.fc2_bias.has_value());
    at::Tensor g_act, g_fc1, g_mlp_in_full;
    std::tie(g_act, g_fc2w) = linear_backward(exit_region_backward(c, g_mlp), saved[kGeluOut], p.fc2_weight);
    std::tie(g_fc1, g_fc1b) = bias_gelu_backward(c, g_act, saved[kFc1Out], p.fc1_bias);
    std::tie(g_mlp_in_full, g_fc1w) = linear_backward(g_fc1, enter_region(c, mlp_in), p.fc1_weight);  // [s, b, h]
    g_mlp_in = enter_region_backward(c, g_mlp_in_full);  // [s_local, b, h]
  }

  // mlp_in = norm(res1); in post-LN, mlp_in is also the MLP's residual.
  at::Tensor g_res1;
  if (c.pre_norm) {
    ProfilePhase phase("megacore.transformer_layer_backward.mlp_norm");
    at::Tensor g_res1_norm;
    std::tie(g_res1_norm, g_n2w, g_n2b) = norm_backward(c, g_mlp_in, res1, p.norm2_weight, p.norm2_bias,
                                                        saved[kNorm2Mean], saved[kNorm2Rstd]);
    g_res1 = g.add(g_res1_norm);
  } else {
    ProfilePhase phase("megacore.transformer_layer_backward.attention_norm");
    std::tie(g_res1, g_n1w, g_n1b) = norm_backward(c, g_mlp_in.add(g), res1, p.norm1_weight, p.norm1_bias,
                                                   saved[kNorm1Mean], saved[kNorm1Rstd]);
  }

  // res1 = bias_dropout_add(attn, proj_bias, x).
  at::Tensor g_context, g_projw, g_projb;
  {
    ProfilePhase phase("megacore.transformer_layer_backward.proj");
    at::Tensor g_attn;
    std::tie(g_attn, g_projb) = bias_dropout_add_backward(g_res1, c.hidden_p(), site_seed(seed, 1, residual_rank(c)),
                                                          p.proj_bias.has_value());
    std::tie(g_context, g_projw) = linear_backward(exit_region_backward(c, g_attn), saved[kContext], p.proj_weight);
  }
  at::Tensor g_q, g_k, g_v;
  {
    ProfilePhase phase("megacore.transformer_layer_backward.attention");
    std::tie(g_q, g_k, g_v) = attention_backward(c, d, flash, g_context, saved, mask, site_seed(seed, 0, c.tp_rank));
  }
  at::Tensor g_x, g_qkvw, g_qkvb;
  {
    ProfilePhase phase("megacore.transformer_layer_backward.qkv");
    at::Tensor g_qkv = merge_head_grads(d, g_q, g_k, g_v, cos, sin);  // [s, b, 3 * np * d]
    const at::Tensor attn_in = c.pre_norm ? saved[kAttnIn] : x;
    at::Tensor g_attn_in_full;
    std::tie(g_attn_in_full, g_qkvw) = linear_backward(g_qkv, enter_region(c, attn_in), p.qkv_weight);
    g_qkvb = p.qkv_bias.has_value() ? bias_grad(g_qkv) : at::Tensor();
    g_x = enter_region_backward(c, g_attn_in_full);
  }
  if (c.pre_norm) {
    ProfilePhase phase("megacore.transformer_layer_backward.attention_norm");
    at::Tensor g_x_norm;
    std::tie(g_x_norm, g_n1w, g_n1b) = norm_backward(c, g_x, x, p.norm1_weight, p.norm1_bias, saved[kNorm1Mean],
                                                     saved[kNorm1Rstd]);
    g_x = g_x_norm.add(g_res1);
  } else {
    g_x = g_x.add(g_res1);
  }

  std::vector<at::Tensor> grads{g_x, g_n1w, g_n1b, g_qkvw, g_qkvb, g_projw, g_projb, g_n2w, g_n2b, g_fc1w, g_fc1b, g_fc2w, g_fc2b};
  // Under sequence parallelism the replicated parameters used on the sequence shard (the norms and the
  // row-parallel biases) got this shard's part of their gradient only. They are summed over the group once
  // per step, with every other such parameter of the model, in one all-reduce
  // (megacore.parallel.sum_sequence_parallel_gradients; the Trainer calls it), as Megatron's
  // finalize_model_grads does: not here, once per layer and micro-batch.
  for (auto& t : grads) {
    if (!t.defined()) t = empty_like_nothing(x);
  }
  return grads;
}

// ---- op entry points: the schema's argument lists -----------------------------------------------------------

#define MEGACORE_LAYER_PARAM_ARGS                                                                             \
  const OptT &attention_norm_weight, const OptT &attention_norm_bias, const at::Tensor &qkv_weight,          \
      const OptT &qkv_bias, const at::Tensor &proj_weight, const OptT &proj_bias, const OptT &mlp_norm_weight, \
      const OptT &mlp_norm_bias, const at::Tensor &fc1_weight, const OptT &fc1_bias, const at::Tensor &fc2_weight, \
      const OptT &fc2_bias
#define MEGACORE_LAYER_PARAMS                                                                                  \
  Params {                                                                                                     \
    attention_norm_weight, attention_norm_bias, qkv_weight, qkv_bias, proj_weight, proj_bias, mlp_norm_weight, \
        mlp_norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias                                              \
  }
#define MEGACORE_LAYER_CONFIG_ARGS                                                                            \
  int64_t num_heads, c10::string_view normalization, double norm_eps, bool pre_norm, c10::string_view mask_kind, \
      std::optional<int64_t> window, c10::string_view activation, double attention_dropout, double hidden_dropout, \
      bool sequence_parallel, bool recompute_attention, c10::string_view attention_backend,                   \
      c10::string_view group_name, bool training
#define MEGACORE_LAYER_CONFIG                                                                                   \
  parse_config(num_heads, normalization, norm_eps, pre_norm, mask_kind, window, activation, attention_dropout,  \
               hidden_dropout, sequence_parallel, recompute_attention, attention_backend, group_name, training)

std::tuple<at::Tensor, std::vector<at::Tensor>> transformer_layer(const at::Tensor& hidden, MEGACORE_LAYER_PARAM_ARGS,
                                                                  const OptT& attention_mask, const OptT& rotary_cos,
                                                                  const OptT& rotary_sin, const at::Tensor& seed,
                                                                  MEGACORE_LAYER_CONFIG_ARGS) {
  const Config c = MEGACORE_LAYER_CONFIG;
  MEGACORE_CHECK_ARG(seed.defined() && seed.scalar_type() == at::kLong && seed.device().is_cpu() && seed.numel() == 1,
                     kOp, "seed must be an int64 CPU tensor of one element");
  return forward(c, hidden, MEGACORE_LAYER_PARAMS, attention_mask, rotary_cos, rotary_sin, seed);
}

std::vector<at::Tensor> transformer_layer_backward(const at::Tensor& grad_out, const at::Tensor& hidden,
                                                   MEGACORE_LAYER_PARAM_ARGS, const OptT& attention_mask,
                                                   const OptT& rotary_cos, const OptT& rotary_sin,
                                                   const at::Tensor& seed, at::TensorList saved,
                                                   MEGACORE_LAYER_CONFIG_ARGS) {
  const Config c = MEGACORE_LAYER_CONFIG;
  MEGACORE_CHECK_ARG(seed.defined() && seed.scalar_type() == at::kLong && seed.device().is_cpu() && seed.numel() == 1,
                     "transformer_layer_backward", "seed must be an int64 CPU tensor of one element");
  return backward(c, grad_out, hidden, MEGACORE_LAYER_PARAMS, attention_mask, rotary_cos, rotary_sin, seed, saved);
}

}  // namespace

// The transformer layer's parameters and configuration, shared by its forward and backward schemas.
#define MEGACORE_LAYER_SCHEMA_PARAMS                                                                             \
  "Tensor? attention_norm_weight, Tensor? attention_norm_bias, Tensor qkv_weight, Tensor? qkv_bias,"             \
  " Tensor proj_weight, Tensor? proj_bias, Tensor? mlp_norm_weight, Tensor? mlp_norm_bias, Tensor fc1_weight,"   \
  " Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias"
#define MEGACORE_LAYER_SCHEMA_CONFIG                                                                             \
  "int num_heads, str normalization, float norm_eps, bool pre_norm, str mask_kind, int? window,"                 \
  " str activation, float attention_dropout, float hidden_dropout, bool sequence_parallel,"                      \
  " bool recompute_attention, str attention_backend, str group_name, bool training"

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  // hidden [s_local, b, h] -> (out [s_local, b, h], saved): saved holds what backward needs, in a fixed
  // order of slots (python/megacore/transformer/layer.py). Parameters are this rank's shards; the
  // tensor-parallel group is resolved from group_name ("" = none). seed: int64 CPU tensor of one element.
  ops::define_op(m,
                 "transformer_layer(Tensor hidden, " MEGACORE_LAYER_SCHEMA_PARAMS
                 ", Tensor? attention_mask, Tensor? rotary_cos, Tensor? rotary_sin, Tensor seed, "
                 MEGACORE_LAYER_SCHEMA_CONFIG ") -> (Tensor, Tensor[])");
  // -> [grad_hidden, one gradient per parameter in the order above (empty [0] for a None parameter)].
  ops::define_op(m,
                 "transformer_layer_backward(Tensor grad_out, Tensor hidden, " MEGACORE_LAYER_SCHEMA_PARAMS
                 ", Tensor? attention_mask, Tensor? rotary_cos, Tensor? rotary_sin, Tensor seed, Tensor[] saved, "
                 MEGACORE_LAYER_SCHEMA_CONFIG ") -> Tensor[]");
}

TORCH_LIBRARY_IMPL(megacore, CompositeExplicitAutograd, m) {
  m.impl("transformer_layer", &transformer_layer);
  m.impl("transformer_layer_backward", &transformer_layer_backward);
}

}  // namespace megacore::transformer
