// The transformer layer's configuration, parameter table, saved slots, attention-backend rule and dropout
// seeds (config.h): parsed and checked once per distinct config string.
#include "transformer/config.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <ATen/OpMathType.h>

#include <charconv>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <unordered_map>

#include "common/checks.h"

namespace megacore::transformer {

const std::array<ParamInfo, kNumParams>& param_table() {
  static const std::array<ParamInfo, kNumParams> table{{
#define MEGACORE_X(arg, name, required) {#arg, name, required},
      MEGACORE_LAYER_PARAM_TABLE(MEGACORE_X)
#undef MEGACORE_X
  }};
  return table;
}

const std::array<const char*, kNumSlots>& slot_names() {
  static const std::array<const char*, kNumSlots> names{{
#define MEGACORE_X(name) #name,
      MEGACORE_LAYER_SLOT_TABLE(MEGACORE_X)
#undef MEGACORE_X
  }};
  return names;
}

namespace {

constexpr const char* kConfigOp = "transformer_layer config";

// The fields in canonical order, with their defaults (nullopt: required).
const std::vector<std::pair<std::string, std::optional<std::string>>>& fields() {
  static const std::vector<std::pair<std::string, std::optional<std::string>>> f{
      {"num_heads", std::nullopt},
      {"head_dim", "none"},
      {"normalization", "layernorm"},
      {"norm_eps", "1e-05"},
      {"pre_norm", "true"},
      {"mask_kind", "causal"},
      {"window", "none"},
      {"activation", "gelu"},
      {"attention_dropout", "0"},
      {"hidden_dropout", "0"},
      {"sequence_parallel", "false"},
      {"recompute_attention", "false"},
      {"attention_backend", "auto"},
      {"softmax_scale", "none"},
      {"attention_bias", "false"},
      {"cross_attention", "false"},
      {"overlap_tp_comm", "true"},
      {"group_name", ""},
      {"training", "true"},
  };
  return f;
}

std::string lower(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

bool parse_bool(const std::string& key, const std::string& v) {
  const std::string l = lower(v);
  if (l == "true" || l == "1") return true;
  if (l == "false" || l == "0") return false;
  MEGACORE_CHECK_ARG(false, kConfigOp, key, "=", v, " is not a bool (true or false)");
  return false;
}

int64_t parse_int(const std::string& key, const std::string& v) {
  int64_t out = 0;
  const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
  MEGACORE_CHECK_ARG(ec == std::errc() && end == v.data() + v.size(), kConfigOp, key, "=", v, " is not an integer");
  return out;
}

double parse_double(const std::string& key, const std::string& v) {
  size_t used = 0;
  double out = 0.0;
  try {
    out = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  MEGACORE_CHECK_ARG(used == v.size() && !v.empty() && std::isfinite(out), kConfigOp, key, "=", v,
                     " is not a finite number");
  return out;
}

template <typename E>
E parse_choice(const std::string& key, const std::string& v, std::initializer_list<std::pair<const char*, E>> choices) {
  std::string valid;
  for (const auto& [name, value] : choices) {
    if (v == name) return value;
    valid += valid.empty() ? name : std::string(", ") + name;
  }
  MEGACORE_CHECK_ARG(false, kConfigOp, key, " '", v, "' is not one of ", valid);
  return choices.begin()->second;
}

std::string format_double(double x) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", x);
  return buf;
}

/// \brief Splits `k=v;k=v` into pairs.
std::vector<std::pair<std::string, std::string>> split_pairs(c10::string_view text) {
  std::vector<std::pair<std::string, std::string>> out;
  size_t start = 0;
  const std::string s(text);
  while (start <= s.size()) {
    size_t end = s.find(';', start);
    if (end == std::string::npos) end = s.size();
    const std::string item = s.substr(start, end - start);
    if (!item.empty()) {
      const size_t eq = item.find('=');
      MEGACORE_CHECK_ARG(eq != std::string::npos, kConfigOp, "'", item, "' is not key=value");
      out.emplace_back(item.substr(0, eq), item.substr(eq + 1));
    }
    start = end + 1;
  }
  return out;
}

/// \brief Builds and checks a Config from (field, value) pairs; also returns its canonical string.
std::pair<Config, std::string> build(const std::vector<std::pair<std::string, std::string>>& given) {
  std::unordered_map<std::string, std::string> values;
  for (const auto& [key, value] : given) {
    bool known = false;
    for (const auto& f : fields()) known = known || f.first == key;
    if (!known) {
      std::string valid;
      for (const auto& f : fields()) valid += (valid.empty() ? "" : ", ") + f.first;
      MEGACORE_CHECK_ARG(false, kConfigOp, "unknown field '", key, "' (fields: ", valid, ")");
    }
    MEGACORE_CHECK_ARG(values.emplace(key, value).second, kConfigOp, "field '", key, "' is given twice");
  }
  for (const auto& [key, def] : fields()) {
    if (!values.count(key)) {
      MEGACORE_CHECK_ARG(def.has_value(), kConfigOp, "field '", key, "' is required");
      values[key] = *def;
    }
  }
  Config c;
  c.num_heads = parse_int("num_heads", values["num_heads"]);
  MEGACORE_CHECK_ARG(c.num_heads >= 1, kOp, "num_heads=", c.num_heads, " must be >= 1");
  if (lower(values["head_dim"]) != "none") {
    c.head_dim = parse_int("head_dim", values["head_dim"]);
    MEGACORE_CHECK_ARG(*c.head_dim >= 1, kOp, "head_dim=", *c.head_dim, " must be >= 1");
  }
  c.norm = parse_choice<Norm>("normalization", values["normalization"],
                              {{"layernorm", Norm::kLayerNorm}, {"rmsnorm", Norm::kRmsNorm}});
  c.eps = parse_double("norm_eps", values["norm_eps"]);
  MEGACORE_CHECK_ARG(c.eps > 0, kOp, "norm_eps=", c.eps, " must be > 0");
  c.pre_norm = parse_bool("pre_norm", values["pre_norm"]);
  c.mask = parse_choice<Mask>("mask_kind", values["mask_kind"],
                              {{"causal", Mask::kCausal}, {"sliding_window", Mask::kSlidingWindow},
                               {"padding", Mask::kPadding}, {"none", Mask::kNone}});
  const std::string window = lower(values["window"]);
  if (window != "none") c.window = parse_int("window", values["window"]);
  MEGACORE_CHECK_ARG((c.mask == Mask::kSlidingWindow) == c.window.has_value(), kOp,
                     "window must be given exactly when mask_kind is sliding_window (mask_kind '", values["mask_kind"],
                     "', window ", values["window"], ")");
  MEGACORE_CHECK_ARG(!c.window.has_value() || *c.window >= 1, kOp, "window=", c.window.value_or(0), " must be >= 1");
  c.activation_name = values["activation"];
  c.activation = parse_choice<Activation>(
      "activation", c.activation_name,
      {{"gelu", Activation::kGelu}, {"gelu_tanh", Activation::kGeluTanh}, {"relu", Activation::kRelu},
       {"geglu", Activation::kGeglu}, {"geglu_erf", Activation::kGegluErf}, {"swiglu", Activation::kSwiglu},
       {"reglu", Activation::kReglu}});
  c.attention_dropout = parse_double("attention_dropout", values["attention_dropout"]);
  c.hidden_dropout = parse_double("hidden_dropout", values["hidden_dropout"]);
  check_probability(kOp, "attention_dropout", c.attention_dropout);
  check_probability(kOp, "hidden_dropout", c.hidden_dropout);
  c.sequence_parallel = parse_bool("sequence_parallel", values["sequence_parallel"]);
  c.recompute_attention = parse_bool("recompute_attention", values["recompute_attention"]);
  c.backend = parse_choice<Backend>("attention_backend", values["attention_backend"],
                                    {{"auto", Backend::kAuto}, {"fused_softmax", Backend::kFusedSoftmax},
                                     {"flash", Backend::kFlash}});
  if (lower(values["softmax_scale"]) != "none") {
    c.softmax_scale = parse_double("softmax_scale", values["softmax_scale"]);
    MEGACORE_CHECK_ARG(*c.softmax_scale > 0, kOp, "softmax_scale=", *c.softmax_scale, " must be > 0");
  }
  c.attention_bias = parse_bool("attention_bias", values["attention_bias"]);
  c.cross_attention = parse_bool("cross_attention", values["cross_attention"]);
  c.overlap_tp_comm = parse_bool("overlap_tp_comm", values["overlap_tp_comm"]);
  c.group_name = values["group_name"];
  MEGACORE_CHECK_ARG(c.group_name.find(';') == std::string::npos, kOp, "group_name '", c.group_name,
                     "' must not contain ';'");
  c.training = parse_bool("training", values["training"]);
  MEGACORE_CHECK_ARG(!c.sequence_parallel || !c.group_name.empty(), kOp,
                     "sequence_parallel needs a tensor-parallel group (group_name is empty)");

  const auto b = [](bool x) { return std::string(x ? "true" : "false"); };
  std::string canonical;
  for (const auto& [key, value] : std::vector<std::pair<std::string, std::string>>{
           {"num_heads", std::to_string(c.num_heads)},
           {"head_dim", c.head_dim ? std::to_string(*c.head_dim) : "none"},
           {"normalization", c.norm == Norm::kLayerNorm ? "layernorm" : "rmsnorm"},
           {"norm_eps", format_double(c.eps)},
           {"pre_norm", b(c.pre_norm)},
           {"mask_kind", values["mask_kind"]},
           {"window", c.window ? std::to_string(*c.window) : "none"},
           {"activation", c.activation_name},
           {"attention_dropout", format_double(c.attention_dropout)},
           {"hidden_dropout", format_double(c.hidden_dropout)},
           {"sequence_parallel", b(c.sequence_parallel)},
           {"recompute_attention", b(c.recompute_attention)},
           {"attention_backend", values["attention_backend"]},
           {"softmax_scale", c.softmax_scale ? format_double(*c.softmax_scale) : "none"},
           {"attention_bias", b(c.attention_bias)},
           {"cross_attention", b(c.cross_attention)},
           {"overlap_tp_comm", b(c.overlap_tp_comm)},
           {"group_name", c.group_name},
           {"training", b(c.training)}}) {
    canonical += (canonical.empty() ? "" : ";") + key + "=" + value;
  }
  return {c, canonical};
}

}  // namespace

std::vector<std::pair<std::string, std::optional<std::string>>> config_fields() { return fields(); }

std::shared_ptr<const Config> config_of(c10::string_view text) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<const Config>> cache;
  const std::string key(text);
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto parsed = std::make_shared<const Config>(build(split_pairs(text)).first);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() > 4096) cache.clear();  // a bound, never reached by a model's handful of layer configs
  return cache.emplace(key, std::move(parsed)).first->second;
}

std::string canonical_config(const std::vector<std::pair<std::string, std::string>>& given) {
  return build(given).second;
}

TensorParallel tensor_parallel_of(const Config& c) {
  if (c.group_name.empty()) return {};
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(c.group_name);
  } catch (const c10::Error&) {
    MEGACORE_CHECK_ARG(false, kOp, "group_name '", c.group_name, "' names no registered process group");
  }
  TensorParallel tp{pg->getSize(), pg->getRank()};
  MEGACORE_CHECK_ARG(c.num_heads % tp.size == 0, kOp, "num_heads=", c.num_heads,
                     " is not divisible by the tensor-parallel size ", tp.size);
  return tp;
}

Dims dims_of(const Config& c, const TensorParallel& tp, int64_t s_local, int64_t b, int64_t h, int64_t fc1_rows,
             int64_t m_local) {
  MEGACORE_CHECK_ARG(c.head_dim.has_value() || h % c.num_heads == 0, kOp, "hidden size ", h,
                     " is not divisible by num_heads=", c.num_heads, " (and no head_dim is given)");
  Dims d{};
  d.s_local = s_local;
  d.b = b;
  d.h = h;
  d.s = c.sequence_parallel ? s_local * tp.size : s_local;
  d.np = c.num_heads / tp.size;
  d.d = c.head_dim.value_or(h / c.num_heads);
  MEGACORE_CHECK_ARG(!c.gated() || fc1_rows % 2 == 0, kOp, "fc1_weight has ", fc1_rows,
                     " rows; a gated activation (", c.activation_name, ") needs an even number ([gate; up])");
  d.f = c.gated() ? fc1_rows / 2 : fc1_rows;
  d.m_local = m_local;
  d.m = c.sequence_parallel ? m_local * tp.size : m_local;
  return d;
}

bool uses_flash(const Config& c, c10::DeviceType device, at::ScalarType dtype, int64_t head_dim) {
  if (c.backend == Backend::kFusedSoftmax) return false;
  MEGACORE_CHECK_ARG(!(c.attention_bias && c.backend == Backend::kFlash), kOp,
                     "attention_backend 'flash' cannot run here: it takes no attention bias");
  if (c.attention_bias) return false;
  const bool mask_ok = c.mask == Mask::kCausal || c.mask == Mask::kNone;
  bool ok = false;
  const char* why = "";
  if (!mask_ok) {
    why = "it handles only mask_kind causal or none";
  } else if (device == c10::DeviceType::CPU) {
    ok = c.attention_p() == 0.0;
    why = "on CPU it has no attention dropout";
  } else if (device == c10::DeviceType::CUDA) {
    ok = (dtype == at::kHalf || dtype == at::kBFloat16) && head_dim % 8 == 0 && head_dim <= 256;
    why = "on CUDA it needs fp16/bf16 and head_dim a multiple of 8, at most 256";
  } else {
    why = "it runs on CPU and CUDA only";
  }
  MEGACORE_CHECK_ARG(ok || c.backend != Backend::kFlash, kOp, "attention_backend 'flash' cannot run here: ", why);
  return ok;
}

std::vector<SlotShape> saved_shapes(const Config& c, const TensorParallel& tp, c10::DeviceType device,
                                    at::ScalarType dtype, const Dims& d) {
  (void)tp;
  const at::ScalarType acc = at::toOpMathType(dtype);
  std::vector<SlotShape> out(kNumSlots, SlotShape{{0}, dtype});
  auto set = [&](Slot s, std::vector<int64_t> shape, at::ScalarType t) { out[s] = SlotShape{std::move(shape), t}; };
  const std::vector<int64_t> hidden{d.s_local, d.b, d.h}, stats{d.s_local, d.b}, heads{d.b, d.np, d.s, d.d};
  auto norm_stats = [&](Slot mean, Slot rstd) {
    set(mean, c.norm == Norm::kLayerNorm ? stats : std::vector<int64_t>{0}, acc);
    set(rstd, stats, acc);
  };
  norm_stats(kSlot_norm1_mean, kSlot_norm1_rstd);
  if (c.pre_norm) set(kSlot_attn_in, hidden, dtype);
  set(kSlot_q, heads, dtype);
  set(kSlot_k, heads, dtype);
  set(kSlot_v, heads, dtype);
  set(kSlot_context, {d.s, d.b, d.np * d.d}, dtype);
  if (uses_flash(c, device, dtype, d.d)) {
    if (device == c10::DeviceType::CPU) {
      set(kSlot_lse, {d.b, d.np, d.s}, at::kFloat);
    } else {
      for (Slot s : {kSlot_lse, kSlot_rng_state, kSlot_rng_unused}) out[s].from_flash = true;
    }
  } else if (!c.recompute_attention) {
    set(kSlot_probs, {d.b, d.np, d.s, d.s}, dtype);
    if (c.attention_p() > 0.0) set(kSlot_probs_dropped, {d.b, d.np, d.s, d.s}, dtype);
  }
  set(kSlot_res1, hidden, dtype);
  if (c.cross_attention) {
    const std::vector<int64_t> cq{d.b, d.np, d.s, d.d}, ckv{d.b, d.np, d.m, d.d};
    norm_stats(kSlot_cross_norm_mean, kSlot_cross_norm_rstd);
    set(kSlot_cross_in, hidden, dtype);
    set(kSlot_cross_q, cq, dtype);
    set(kSlot_cross_k, ckv, dtype);
    set(kSlot_cross_v, ckv, dtype);
    if (!c.recompute_attention) {
      set(kSlot_cross_probs, {d.b, d.np, d.s, d.m}, dtype);
      if (c.attention_p() > 0.0) set(kSlot_cross_probs_dropped, {d.b, d.np, d.s, d.m}, dtype);
    }
    set(kSlot_cross_context, {d.s, d.b, d.np * d.d}, dtype);
    set(kSlot_res_cross, hidden, dtype);
  }
  norm_stats(kSlot_norm2_mean, kSlot_norm2_rstd);
  set(kSlot_mlp_in, hidden, dtype);
  set(kSlot_fc1_out, {d.s, d.b, c.gated() ? 2 * d.f : d.f}, dtype);
  set(kSlot_act_out, {d.s, d.b, d.f}, dtype);
  if (!c.pre_norm) set(kSlot_res2, hidden, dtype);
  return out;
}

int64_t site_seed(int64_t seed, DropoutSite site, int64_t rank) {
  const uint64_t mixed = static_cast<uint64_t>(seed) +
                         (static_cast<uint64_t>(site) * 65536u + static_cast<uint64_t>(rank)) * 0x9E3779B97F4A7C15ull;
  return static_cast<int64_t>(mixed);
}

int64_t site_rank(const Config& c, const TensorParallel& tp, DropoutSite site) {
  if (site == DropoutSite::kAttention || site == DropoutSite::kCrossAttention) return tp.rank;  // per-rank heads
  return c.sequence_parallel ? tp.rank : 0;
}

}  // namespace megacore::transformer
