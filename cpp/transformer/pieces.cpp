// The pieces the transformer layer is built from (pieces.h).
#include "transformer/pieces.h"

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

#include "ops/linear.h"
#include "parallel/group.h"

namespace megacore::transformer {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

at::Tensor seed_tensor(int64_t seed) { return at::scalar_tensor(seed, at::TensorOptions().dtype(at::kLong)); }

at::Tensor all_reduce(const TensorParallel& tp, const Config& c, const at::Tensor& x) {
  if (tp.size == 1) return x;
  static auto op = find_op<at::Tensor(const at::Tensor&, const std::string&, const std::string&)>("megacore::all_reduce");
  return op.call(x, c.group_name, "sum");
}

/// \brief [n, ...] -> [tp * n, ...]
at::Tensor gather_sequence(const TensorParallel& tp, const Config& c, const at::Tensor& x) {
  if (tp.size == 1) return x;
  static auto op = find_op<at::Tensor(const at::Tensor&, int64_t, const std::string&)>("megacore::all_gather");
  return op.call(x, 0, c.group_name);
}

/// \brief [tp * n, ...] -> [n, ...], summed over ranks.
at::Tensor reduce_scatter_sequence(const TensorParallel& tp, const Config& c, const at::Tensor& x) {
  if (tp.size == 1) return x;
  static auto op = find_op<at::Tensor(const at::Tensor&, int64_t, const std::string&)>("megacore::reduce_scatter");
  return op.call(x, 0, c.group_name);
}

}  // namespace

at::Tensor nothing(const at::Tensor& like) { return at::empty({0}, like.options()); }

T3 norm_forward(const Config& c, const at::Tensor& x, const OptT& w, const OptT& b) {
  if (c.norm == Norm::kLayerNorm) {
    static auto op = find_op<T3(const at::Tensor&, const OptT&, const OptT&, double)>("megacore::layer_norm");
    return op.call(x, w, b, c.eps);
  }
  static auto op = find_op<T2(const at::Tensor&, const OptT&, double)>("megacore::rms_norm");
  auto [out, rstd] = op.call(x, w, c.eps);
  return {out, nothing(rstd), rstd};
}

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

at::Tensor bias_dropout_add(const at::Tensor& x, const OptT& bias, const at::Tensor& residual, double p, int64_t seed) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const OptT&, const at::Tensor&, double, const at::Tensor&)>(
      "megacore::bias_dropout_add");
  return op.call(x, bias, residual, p, seed_tensor(seed));
}

T2 bias_dropout_add_backward(const at::Tensor& g, double p, int64_t seed, bool has_bias) {
  static auto op = find_op<T2(const at::Tensor&, double, const at::Tensor&, bool)>(
      "megacore::bias_dropout_add_backward");
  auto [gx, gb] = op.call(g, p, seed_tensor(seed), has_bias);
  return {gx, has_bias ? gb : at::Tensor()};
}

at::Tensor bias_activation(const Config& c, const at::Tensor& x, const OptT& bias) {
  using Named = at::Tensor(const at::Tensor&, const OptT&, c10::string_view);
  switch (c.activation) {
    case Activation::kGelu:
    case Activation::kGeluTanh: {
      static auto op = find_op<Named>("megacore::bias_gelu");
      return op.call(x, bias, c.activation == Activation::kGelu ? "none" : "tanh");
    }
    case Activation::kRelu: {
      static auto op = find_op<at::Tensor(const at::Tensor&, const OptT&)>("megacore::bias_relu");
      return op.call(x, bias);
    }
    default: {
      static auto op = find_op<Named>("megacore::bias_gated");
      return op.call(x, bias, c.activation_name);
    }
  }
}

T2 bias_activation_backward(const Config& c, const at::Tensor& g, const at::Tensor& x, const OptT& bias) {
  using Named = T2(const at::Tensor&, const at::Tensor&, const OptT&, c10::string_view);
  at::Tensor gx, gb;
  switch (c.activation) {
    case Activation::kGelu:
    case Activation::kGeluTanh: {
      static auto op = find_op<Named>("megacore::bias_gelu_backward");
      std::tie(gx, gb) = op.call(g, x, bias, c.activation == Activation::kGelu ? "none" : "tanh");
      break;
    }
    case Activation::kRelu: {
      static auto op = find_op<T2(const at::Tensor&, const at::Tensor&, const OptT&)>("megacore::bias_relu_backward");
      std::tie(gx, gb) = op.call(g, x, bias);
      break;
    }
    default: {
      static auto op = find_op<Named>("megacore::bias_gated_backward");
      std::tie(gx, gb) = op.call(g, x, bias, c.activation_name);
    }
  }
  return {gx, bias.has_value() ? gb : at::Tensor()};
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&);
  static auto fwd = find_op<Sig>("megacore::apply_rotary_emb");
  static auto bwd = find_op<Sig>("megacore::apply_rotary_emb_backward");
  return backward ? bwd.call(x, cos, sin) : fwd.call(x, cos, sin);
}

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

at::Tensor biased_softmax(const Config& c, const at::Tensor& scores, const at::Tensor& bias, const OptT& mask,
                          double scale) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, double, bool,
                                      std::optional<int64_t>)>("megacore::scaled_bias_softmax");
  const bool causal = c.mask == Mask::kCausal || c.mask == Mask::kSlidingWindow;
  return op.call(scores, bias, c.mask == Mask::kPadding ? mask : OptT(), scale, causal, c.window);
}

T2 biased_softmax_backward(const at::Tensor& g, const at::Tensor& probs, double scale, at::IntArrayRef bias_shape) {
  static auto op = find_op<T2(const at::Tensor&, const at::Tensor&, double, at::IntArrayRef)>(
      "megacore::scaled_bias_softmax_backward");
  return op.call(g, probs, scale, bias_shape);
}

at::Tensor padded_softmax(const at::Tensor& scores, const OptT& mask, double scale) {
  static auto op = find_op<at::Tensor(const at::Tensor&, const OptT&, double)>("megacore::scaled_masked_softmax");
  return op.call(scores, mask, scale);
}

PendingRegionBackward::PendingRegionBackward(const Config& c, const TensorParallel& tp, const at::Tensor& g) {
  if (tp.size == 1) {
    result_ = g;
    return;
  }
  if (!c.overlap_tp_comm) {
    result_ = enter_region_backward(c, tp, g);
    return;
  }
  const char* op = "transformer_layer_backward";
  auto pg = resolve_group(op, c.group_name);
  const c10::DeviceType device = g.device().type();
  if (c.sequence_parallel) {  // reduce-scatter along the sequence: [s, ...] -> [s / tp, ...]
    at::Tensor input = g.contiguous();
    auto shape = input.sizes().vec();
    shape[0] /= tp.size;
    at::Tensor output = input.new_empty(shape);
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    auto work = pg->reduce_scatter_single(output, input, opts);
    finish_ = [=] {
      wait_for(op, work, pg, device, "the input gradient's reduce-scatter");
      return output;
    };
  } else {
    std::vector<at::Tensor> tensors{g.contiguous()};  // g is this layer's own temporary: reduced in place
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    auto work = pg->allreduce(tensors, opts);
    finish_ = [=] {
      wait_for(op, work, pg, device, "the input gradient's all-reduce");
      return tensors[0];
    };
  }
}

at::Tensor PendingRegionBackward::wait() {
  if (finish_) {
    result_ = finish_();
    finish_ = nullptr;
  }
  return result_;
}

at::Tensor enter_region(const Config& c, const TensorParallel& tp, const at::Tensor& x) {
  return c.sequence_parallel ? gather_sequence(tp, c, x) : x;
}

at::Tensor enter_region_backward(const Config& c, const TensorParallel& tp, const at::Tensor& g) {
  return c.sequence_parallel ? reduce_scatter_sequence(tp, c, g) : all_reduce(tp, c, g);
}

at::Tensor exit_region(const Config& c, const TensorParallel& tp, const at::Tensor& x) {
  return c.sequence_parallel ? reduce_scatter_sequence(tp, c, x) : all_reduce(tp, c, x);
}

at::Tensor exit_region_backward(const Config& c, const TensorParallel& tp, const at::Tensor& g) {
  return c.sequence_parallel ? gather_sequence(tp, c, g) : g;
}

at::Tensor matmul_t(const at::Tensor& x, const at::Tensor& w, const OptT& bias) { return ops::linear(x, w, bias); }

T2 linear_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w) {
  at::Tensor g2 = g.reshape({-1, g.size(-1)});
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  return {at::matmul(g, w), at::mm(g2.t(), x2)};
}

at::Tensor bias_grad(const at::Tensor& g) {
  return g.reshape({-1, g.size(-1)}).sum(0, /*keepdim=*/false, at::toOpMathType(g.scalar_type())).to(g.scalar_type());
}

}  // namespace megacore::transformer
