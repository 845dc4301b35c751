#pragma once
// The transformer layer's one definition of what both sides of the op must agree on: its parameters (the
// schema's tensor arguments, in order), its configuration (one `str config` argument, parsed and checked
// once per distinct string), the saved-for-backward slots and their shapes, the attention-backend rule and
// the dropout-seed derivation. Python reads all of it from here (megacore._C.transformer_layer_spec and
// friends, cpp/module.cpp); nothing is mirrored by hand.
#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace megacore::transformer {

inline constexpr const char* kOp = "transformer_layer";

// ---- parameters ------------------------------------------------------------------------------------------
// X(schema argument, module parameter name, required). The schema's tensor arguments, the Params struct,
// the backward's gradient order and Python's parameter names all come from this table.
#define MEGACORE_LAYER_PARAM_TABLE(X)                          \
  X(attention_norm_weight, "attention_norm.weight", false)     \
  X(attention_norm_bias, "attention_norm.bias", false)         \
  X(qkv_weight, "attention.qkv.weight", true)                  \
  X(qkv_bias, "attention.qkv.bias", false)                     \
  X(proj_weight, "attention.proj.weight", true)                \
  X(proj_bias, "attention.proj.bias", false)                   \
  X(mlp_norm_weight, "mlp_norm.weight", false)                 \
  X(mlp_norm_bias, "mlp_norm.bias", false)                     \
  X(fc1_weight, "mlp.fc1.weight", true)                        \
  X(fc1_bias, "mlp.fc1.bias", false)                           \
  X(fc2_weight, "mlp.fc2.weight", true)                        \
  X(fc2_bias, "mlp.fc2.bias", false)                           \
  X(cross_norm_weight, "cross_attention_norm.weight", false)   \
  X(cross_norm_bias, "cross_attention_norm.bias", false)       \
  X(cross_q_weight, "cross_attention.q.weight", false)         \
  X(cross_q_bias, "cross_attention.q.bias", false)             \
  X(cross_kv_weight, "cross_attention.kv.weight", false)       \
  X(cross_kv_bias, "cross_attention.kv.bias", false)           \
  X(cross_proj_weight, "cross_attention.proj.weight", false)   \
  X(cross_proj_bias, "cross_attention.proj.bias", false)

enum Param : int {
#define MEGACORE_X(arg, name, required) k_##arg,
  MEGACORE_LAYER_PARAM_TABLE(MEGACORE_X)
#undef MEGACORE_X
  kNumParams
};

struct ParamInfo {
  const char* arg;     // the schema's argument name
  const char* name;    // the nn.Module parameter's name
  bool required;
};
const std::array<ParamInfo, kNumParams>& param_table();

/// \brief This rank's parameter shards, by Param; absent optional ones are nullopt.
struct Params {
  std::array<std::optional<at::Tensor>, kNumParams> t;
  const at::Tensor& operator[](Param p) const { return *t[p]; }  // a required one
  const std::optional<at::Tensor>& opt(Param p) const { return t[p]; }
  bool has(Param p) const { return t[p].has_value(); }
};

// ---- saved-for-backward slots ------------------------------------------------------------------------------
// Each residual sub-block (self-attention, cross-attention, MLP) keeps its norm's statistics, its input (pre-LN:
// the normalized one; post-LN: the previous sub-block's normalized output, nothing for the first) and its residual
// sum (pre-LN: the next sub-block's input; post-LN: what its norm normalizes).
#define MEGACORE_LAYER_SLOT_TABLE(X)                                                                           \
  X(norm1_mean) X(norm1_rstd) X(attn_in) X(q) X(k) X(v) X(probs) X(probs_dropped) X(context) X(lse) X(rng_state) \
  X(rng_unused) X(res1) X(cross_norm_mean) X(cross_norm_rstd) X(cross_in) X(cross_q) X(cross_k) X(cross_v)      \
  X(cross_probs) X(cross_probs_dropped) X(cross_context) X(res_cross) X(norm2_mean) X(norm2_rstd) X(mlp_in)      \
  X(fc1_out) X(act_out) X(res2)

enum Slot : int {
#define MEGACORE_X(name) kSlot_##name,
  MEGACORE_LAYER_SLOT_TABLE(MEGACORE_X)
#undef MEGACORE_X
  kNumSlots
};
const std::array<const char*, kNumSlots>& slot_names();

// ---- configuration -------------------------------------------------------------------------------------------
enum class Norm { kLayerNorm, kRmsNorm };
enum class Mask { kCausal, kSlidingWindow, kPadding, kNone };
enum class Backend { kAuto, kFusedSoftmax, kFlash };
enum class Activation { kGelu, kGeluTanh, kRelu, kGeglu, kGegluErf, kSwiglu, kReglu };

/// \brief The layer's configuration. Built from the op's `config` string by config_of, which checks every
///        field once and caches the result per distinct string.
struct Config {
  int64_t num_heads = 0;  // over the whole tensor-parallel group
  std::optional<int64_t> head_dim;  // None: hidden / num_heads; else any width (Megatron's kv_channels, T5's d_kv)
  Norm norm = Norm::kLayerNorm;
  double eps = 1e-5;
  bool pre_norm = true;
  Mask mask = Mask::kCausal;
  std::optional<int64_t> window;
  Activation activation = Activation::kGelu;
  std::string activation_name = "gelu";
  double attention_dropout = 0.0, hidden_dropout = 0.0;
  bool sequence_parallel = false, recompute_attention = false, training = true;
  Backend backend = Backend::kAuto;
  std::optional<double> softmax_scale;  // None: 1 / sqrt(head_dim); T5 uses 1
  bool attention_bias = false;           // the op takes an additive bias on the self-attention scores
  bool cross_attention = false;          // a decoder layer: self-attention, cross-attention to a memory, MLP
  bool overlap_tp_comm = true;           // backward: the input gradient's collective runs under the weight GEMM
  std::string group_name;                // "" = no tensor parallelism

  double attention_p() const { return training ? attention_dropout : 0.0; }
  double hidden_p() const { return training ? hidden_dropout : 0.0; }
  /// \brief A gated MLP (fc1 gives [gate; up], twice the FFN width).
  bool gated() const { return activation >= Activation::kGeglu; }
  double scale(int64_t head_dim) const { return softmax_scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim))); }
};

/// \brief The configuration's fields, in canonical order, with their defaults as strings (None = required).
std::vector<std::pair<std::string, std::optional<std::string>>> config_fields();

/// \brief Parses and checks `key=value;key=value` (any order, unknown keys and bad values raise ValueError
///        naming the field); the result is cached per distinct string.
std::shared_ptr<const Config> config_of(c10::string_view text);

/// \brief The canonical string of a configuration given as (field, value) pairs: what Python passes as the
///        op's `config`. Raises ValueError for an unknown field or a bad value.
std::string canonical_config(const std::vector<std::pair<std::string, std::string>>& fields);

/// \brief The tensor-parallel group of a configuration: (size, rank), (1, 0) without one.
struct TensorParallel {
  int64_t size = 1, rank = 0;
};
TensorParallel tensor_parallel_of(const Config& c);

// ---- shapes -----------------------------------------------------------------------------------------------------
/// \brief Sizes derived from the input and the weights. f: this rank's FFN width (fc2's input; fc1 gives 2f when
///        gated); m_local / m: the memory's length (cross-attention; split like hidden under sequence parallelism).
struct Dims {
  int64_t s_local, s, b, h, np, d, f, m_local = 0, m = 0;
};

/// \brief The sizes of a call, checked against the configuration (heads divide the hidden size and the
///        tensor-parallel size). fc1_rows: fc1_weight's rows; m_local: the memory's length, 0 without one.
Dims dims_of(const Config& c, const TensorParallel& tp, int64_t s_local, int64_t b, int64_t h, int64_t fc1_rows,
             int64_t m_local = 0);

/// \brief Whether the layer runs PyTorch's flash kernel instead of GEMM + megacore's fused softmax: only for
///        causal or unmasked attention; on CPU without attention dropout, on CUDA for fp16/bf16 with head_dim a
///        multiple of 8 up to 256. attention_backend='flash' where it cannot run raises ValueError.
bool uses_flash(const Config& c, c10::DeviceType device, at::ScalarType dtype, int64_t head_dim);

/// \brief The shape and dtype of each saved slot, for the fake kernel (an empty [0] tensor where a
///        configuration does not use a slot). On CUDA with flash the kernel's own lse / rng tensors are
///        marked `from_flash` (their shapes are the aten op's).
struct SlotShape {
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  bool from_flash = false;
};
std::vector<SlotShape> saved_shapes(const Config& c, const TensorParallel& tp, c10::DeviceType device,
                                    at::ScalarType dtype, const Dims& d);

// ---- dropout ---------------------------------------------------------------------------------------------------
/// \brief The dropout sites: the attention probabilities, the residual dropouts after attention and MLP, the
///        cross-attention probabilities and the residual dropout after cross-attention.
enum class DropoutSite : int64_t {
  kAttention = 0, kAfterAttention = 1, kAfterMlp = 2, kCrossAttention = 3, kAfterCrossAttention = 4
};

/// \brief The Philox seed of one dropout site: seed + (site * 65536 + rank) * 0x9E3779B97F4A7C15 (mod 2^64).
///        The attention sites use the tensor-parallel rank (each rank owns other heads); the residual sites the
///        tensor-parallel rank under sequence parallelism (each rank holds other tokens), else 0 (the hidden
///        state is replicated: every rank drops the same elements).
int64_t site_seed(int64_t seed, DropoutSite site, int64_t rank);
int64_t site_rank(const Config& c, const TensorParallel& tp, DropoutSite site);

}  // namespace megacore::transformer
