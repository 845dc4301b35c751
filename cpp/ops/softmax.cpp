// The scaled softmax family: softmax(scale * scores) over the last dim with a padding mask or a causal
// (sliding-window) mask, the same with an additive attention bias (T5's relative positions, ALiBi), and
// their backwards. Schemas, argument checks, the mask's and the bias's row layouts (a broadcast mask or
// bias is read in place, never materialized at scores' size), allocation, and the CPU and CUDA
// registrations; the kernels are kernels/softmax.h's.
#include "kernels/softmax.h"

#include <optional>

#include "ops/op.h"

namespace megacore::ops {
namespace {

/// \brief scores must be a float tensor [..., sq, sk].
void check_scores(const char* op, const at::Tensor& scores) {
  check_float_tensor(op, "scores", scores);
  check_min_dim(op, "scores", scores, 2, "[..., sq, sk]");
}

/// \brief mask must be bool, on scores' device, and broadcastable to scores' shape.
void check_mask(const char* op, const at::Tensor& mask, const at::Tensor& scores) {
  MEGACORE_CHECK_TYPE(mask.scalar_type() == at::kBool, op, "mask has dtype ", mask.scalar_type(),
                      ", expected Bool (True = excluded)");
  check_same_device(op, "mask", mask, "scores", scores);
  bool ok = mask.dim() <= scores.dim();
  for (int64_t d = 1; ok && d <= mask.dim(); ++d) {
    ok = mask.size(-d) == 1 || mask.size(-d) == scores.size(-d);
  }
  MEGACORE_CHECK_ARG(ok, op, "mask has shape ", shape_str(mask.sizes()), ", which does not broadcast to scores' shape ",
                     shape_str(scores.sizes()));
}

/// \brief Causal attention needs sq <= sk (queries aligned to the end of the keys) and window >= 1.
void check_causal(const char* op, const at::Tensor& scores, std::optional<int64_t> window) {
  const int64_t sq = scores.size(-2), sk = scores.size(-1);
  MEGACORE_CHECK_ARG(sq <= sk, op, "scores has sq = ", sq, " > sk = ", sk, " (shape ", shape_str(scores.sizes()),
                     "); causal queries are aligned to the end of the keys, so sq <= sk");
  MEGACORE_CHECK_ARG(!window.has_value() || *window >= 1, op, "window is ", window.value_or(0),
                     ", expected >= 1 (or None for no window)");
}

/// \brief grad_out and probs of scaled_softmax_backward: float, same shape, dtype and device.
void check_softmax_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& probs) {
  check_float_tensor(op, "probs", probs);
  check_min_dim(op, "probs", probs, 1, "[..., sk]");
  check_same_dtype_device(op, "grad_out", grad_out, "probs", probs);
  check_same_shape(op, "grad_out", grad_out, "probs", probs);
}

/// \brief scores of scaled_bias_softmax (and probs of its backward): a float tensor [b, h, sq, sk].
void check_scores_4d(const char* op, const char* name, const at::Tensor& scores) {
  check_float_tensor(op, name, scores);
  MEGACORE_CHECK_ARG(scores.dim() == 4, op, name, " has ", scores.dim(), " dims (shape ", shape_str(scores.sizes()),
                     "), expected 4: [b, h, sq, sk]");
}

/// \brief A bias shape (bias's, or bias_shape of the backward) must have 4 dims, each 1 or the size of
///        scores' dim: [b or 1, h or 1, sq or 1, sk or 1].
void check_bias_shape(const char* op, const char* name, at::IntArrayRef shape, const char* scores_name,
                      const at::Tensor& scores) {
  MEGACORE_CHECK_ARG(shape.size() == 4, op, name, " has shape ", shape_str(shape), ", expected 4 dims [b, h, sq, sk], "
                     "each 1 or the size of ", scores_name, "' dim (", scores_name, ": ", shape_str(scores.sizes()), ")");
  for (int64_t d = 0; d < 4; ++d) {
    MEGACORE_CHECK_ARG(shape[d] == 1 || shape[d] == scores.size(d), op, name, " has shape ", shape_str(shape),
                       ", expected each dim 1 or the size of ", scores_name, "' dim: dim ", d, " is ", shape[d],
                       ", expected 1 or ", scores.size(d), " (", scores_name, ": ", shape_str(scores.sizes()), ")");
  }
}

/// \brief The kernels' layout of a bias of shape `shape` (checked by check_bias_shape) over scores.
kernels::BiasLayout bias_layout(at::IntArrayRef shape, const at::Tensor& scores) {
  return {scores.size(0), scores.size(1), scores.size(2), shape[0], shape[1], shape[2], shape[3] == scores.size(3)};
}

/// \brief A mask's row layout for the kernels (kernels::MaskRows) and the tensor its pointer points into,
///        which must outlive the launch.
struct Mask {
  at::Tensor storage;
  kernels::MaskRows rows{};  // rows.data null: no mask
};

/// \brief The layout of `mask` (checked by check_mask) read as if expanded to scores' shape: scores' leading
///        dims coalesced to at most kMaxMaskDims dims of (size, stride), stride 0 on broadcast dims. A mask
///        whose broadcast dims do not coalesce into kMaxMaskDims dims (rank > 7 or so) is materialized.
Mask mask_rows(const at::Tensor& mask, const at::Tensor& scores) {
  at::Tensor m = mask.dim() == 0 ? mask.reshape({1}) : mask;
  // Keys must be 1 apart (or all the same): a strided last dim is copied, which costs mask's size only.
  if (m.size(-1) != 1 && m.stride(-1) != 1) m = m.contiguous();
  at::Tensor e = m.expand(scores.sizes());  // strides 0 on broadcast dims, no copy
  for (int attempt = 0; attempt < 2; ++attempt) {
    // Coalesce the leading dims from the innermost out: drop size-1 dims, merge an outer dim into the
    // inner one when it steps exactly over it.
    int64_t sizes[16], strides[16];  // scratch, innermost first
    int n = 0;
    bool fits = true;
    for (int64_t d = scores.dim() - 2; d >= 0 && fits; --d) {
      const int64_t size = e.size(d), stride = e.stride(d);
      if (size == 1) continue;
      if (n > 0 && stride == strides[n - 1] * sizes[n - 1]) {
        sizes[n - 1] *= size;
      } else if (n < kernels::kMaxMaskDims) {
        sizes[n] = size;
        strides[n] = stride;
        ++n;
      } else {
        fits = false;
      }
    }
    if (fits) {
      Mask r;
      r.storage = e;
      r.rows.data = e.const_data_ptr<bool>();
      r.rows.col_stride = scores.size(-1) > 1 ? e.stride(-1) : 0;
      r.rows.ndim = n;
      for (int i = 0; i < n; ++i) {  // stored outermost first
        r.rows.sizes[i] = sizes[n - 1 - i];
        r.rows.strides[i] = strides[n - 1 - i];
      }
      return r;
    }
    e = e.contiguous();  // rare: too many broadcast dims to index in place
  }
  TORCH_INTERNAL_ASSERT(false, "a contiguous mask always coalesces");
}

at::Tensor scaled_masked_softmax(const at::Tensor& scores, const std::optional<at::Tensor>& mask, double scale) {
  check_scores("scaled_masked_softmax", scores);
  if (mask.has_value()) check_mask("scaled_masked_softmax", *mask, scores);
  const at::OptionalDeviceGuard guard(at::device_of(scores));
  const at::Tensor sc = scores.contiguous();
  at::Tensor out = at::empty_like(sc);
  const Mask m = mask.has_value() ? mask_rows(*mask, sc) : Mask{};
  const kernels::ScaledMaskedSoftmaxForward p{sc.const_data_ptr(), out.mutable_data_ptr(), rows_of(sc), sc.size(-1),
                                              dtype_of(sc), scale, m.rows};
  MEGACORE_LAUNCH("scaled_masked_softmax", scaled_masked_softmax_forward, sc, p);
  return out;
}

at::Tensor scaled_causal_softmax(const at::Tensor& scores, double scale, std::optional<int64_t> window) {
  check_scores("scaled_causal_softmax", scores);
  check_causal("scaled_causal_softmax", scores, window);
  const at::OptionalDeviceGuard guard(at::device_of(scores));
  const at::Tensor sc = scores.contiguous();
  at::Tensor out = at::empty_like(sc);
  const kernels::ScaledCausalSoftmaxForward p{sc.const_data_ptr(), out.mutable_data_ptr(), rows_of(sc), sc.size(-2),
                                              sc.size(-1), window.value_or(0), dtype_of(sc), scale};
  MEGACORE_LAUNCH("scaled_causal_softmax", scaled_causal_softmax_forward, sc, p);
  return out;
}

at::Tensor scaled_softmax_backward(const at::Tensor& grad_out, const at::Tensor& probs, double scale) {
  check_softmax_backward("scaled_softmax_backward", grad_out, probs);
  const at::OptionalDeviceGuard guard(at::device_of(probs));
  const at::Tensor gc = grad_out.contiguous(), pc = probs.contiguous();
  at::Tensor grad_scores = at::empty_like(pc);
  const kernels::ScaledSoftmaxBackward p{gc.const_data_ptr(), pc.const_data_ptr(), grad_scores.mutable_data_ptr(),
                                         rows_of(pc), pc.size(-1), dtype_of(pc), scale};
  MEGACORE_LAUNCH("scaled_softmax_backward", scaled_softmax_backward, pc, p);
  return grad_scores;
}

at::Tensor scaled_bias_softmax(const at::Tensor& scores, const at::Tensor& bias, const std::optional<at::Tensor>& mask,
                               double scale, bool causal, std::optional<int64_t> window) {
  const char* op = "scaled_bias_softmax";
  check_scores_4d(op, "scores", scores);
  check_same_dtype_device(op, "bias", bias, "scores", scores);
  check_bias_shape(op, "bias", bias.sizes(), "scores", scores);
  if (mask.has_value()) check_mask(op, *mask, scores);
  MEGACORE_CHECK_ARG(causal || !window.has_value(), op, "window is ", window.value_or(0),
                     " but causal is False; a sliding window needs causal=True");
  if (causal) check_causal(op, scores, window);
  const at::OptionalDeviceGuard guard(at::device_of(scores));
  const at::Tensor sc = scores.contiguous(), bc = bias.contiguous();
  at::Tensor out = at::empty_like(sc);
  const Mask m = mask.has_value() ? mask_rows(*mask, sc) : Mask{};
  const kernels::ScaledBiasSoftmaxForward p{sc.const_data_ptr(), bc.const_data_ptr(), out.mutable_data_ptr(),
                                            sc.size(-1), bias_layout(bc.sizes(), sc), m.rows, causal,
                                            causal ? window.value_or(0) : 0, dtype_of(sc), scale};
  MEGACORE_LAUNCH(op, scaled_bias_softmax_forward, sc, p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> scaled_bias_softmax_backward(const at::Tensor& grad_out, const at::Tensor& probs,
                                                                double scale, at::IntArrayRef bias_shape) {
  const char* op = "scaled_bias_softmax_backward";
  check_scores_4d(op, "probs", probs);
  check_softmax_backward(op, grad_out, probs);
  check_bias_shape(op, "bias_shape", bias_shape, "probs", probs);
  const at::OptionalDeviceGuard guard(at::device_of(probs));
  const at::Tensor gc = grad_out.contiguous(), pc = probs.contiguous();
  at::Tensor grad_scores = at::empty_like(pc);
  at::Tensor grad_bias = at::empty(bias_shape, pc.options());
  const kernels::BiasLayout layout = bias_layout(bias_shape, pc);
  const int64_t rows = rows_of(pc), sk = pc.size(-1);
  if (rows == 0 || sk == 0) grad_bias.zero_();  // nothing to sum; kernels do not run on empty input
  at::Tensor workspace;  // CUDA: the chunks' partial sums of the bias gradient
  if (pc.is_cuda() && rows > 0 && sk > 0) {
    const int64_t brows = kernels::softmax::bias_rows(layout);
    workspace = at::empty({kernels::softmax::bias_grad_chunks(rows, brows) * brows * kernels::softmax::bias_cols(layout, sk)},
                          pc.options().dtype(acc_dtype(pc)));
  }
  const kernels::ScaledBiasSoftmaxBackward p{gc.const_data_ptr(), pc.const_data_ptr(), grad_scores.mutable_data_ptr(),
                                             grad_bias.mutable_data_ptr(), mutable_ptr_or_null(workspace), sk,
                                             layout, dtype_of(pc), scale};
  MEGACORE_LAUNCH(op, scaled_bias_softmax_backward, pc, p);
  return {grad_scores, grad_bias};
}

void register_kernels(torch::Library& m) {
  m.impl("scaled_masked_softmax", &scaled_masked_softmax);
  m.impl("scaled_causal_softmax", &scaled_causal_softmax);
  m.impl("scaled_softmax_backward", &scaled_softmax_backward);
  m.impl("scaled_bias_softmax", &scaled_bias_softmax);
  m.impl("scaled_bias_softmax_backward", &scaled_bias_softmax_backward);
}

}  // namespace
}  // namespace megacore::ops

TORCH_LIBRARY_FRAGMENT(megacore, m) {
  // ---- softmax(scale * scores) over the last dim with masking; fully masked rows give zeros ----------
  // mask: bool, broadcastable to scores, True = exclude (Megatron's convention).
  megacore::ops::define_op(m, "scaled_masked_softmax(Tensor scores, Tensor? mask, float scale) -> Tensor");
  // scores [..., sq, sk]; query i sees keys j <= i + (sk - sq), and with a window w only j > i + (sk - sq) - w.
  megacore::ops::define_op(m, "scaled_causal_softmax(Tensor scores, float scale, int? window=None) -> Tensor");
  // grad_scores = scale * probs * (grad_out - sum(grad_out * probs)), for every mask kind.
  megacore::ops::define_op(m, "scaled_softmax_backward(Tensor grad_out, Tensor probs, float scale) -> Tensor");
  // ---- softmax(scale * scores + bias): an additive attention bias (T5 relative positions, ALiBi) -----
  // scores [b, h, sq, sk]; bias of scores' dtype, 4 dims each 1 or scores' size ([1, h, sq, sk] for T5,
  // [1, h, 1, sk] ALiBi-like); mask as scaled_masked_softmax's; causal as scaled_causal_softmax's (window
  // needs causal); mask and causal may be combined (both exclude). A row with no visible key is zeros.
  megacore::ops::define_op(m,
                           "scaled_bias_softmax(Tensor scores, Tensor bias, Tensor? mask, float scale, bool causal=False, "
                           "int? window=None) -> Tensor");
  // -> (grad_scores, grad_bias): dS = probs * (grad_out - sum(grad_out * probs)), grad_scores = scale * dS,
  // grad_bias = dS summed over the dims where bias_shape is 1 (shape bias_shape, probs' dtype).
  megacore::ops::define_op(m,
                           "scaled_bias_softmax_backward(Tensor grad_out, Tensor probs, float scale, int[] bias_shape) "
                           "-> (Tensor grad_scores, Tensor grad_bias)");
}

MEGACORE_REGISTER_KERNELS(megacore::ops::register_kernels)
