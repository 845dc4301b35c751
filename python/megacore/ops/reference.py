"""Pure-PyTorch definitions of megacore's fused ops: the math the kernels are tested against, and
the "same math in PyTorch eager" of the benchmarks. Written from the definitions, not from the
kernels; they compute in the input dtype unless said otherwise, the way a user's PyTorch would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bias_gelu(x, bias=None, approximate="tanh"):
    return F.gelu(x + bias if bias is not None else x, approximate=approximate)


def bias_relu(x, bias=None):
    return F.relu(x + bias if bias is not None else x)


_GATED_ACTIVATIONS = {
    "geglu": lambda gate: F.gelu(gate, approximate="tanh"),
    "geglu_erf": lambda gate: F.gelu(gate, approximate="none"),
    "swiglu": F.silu,
    "reglu": F.relu,
}


def bias_gated(x, bias=None, activation="swiglu"):
    """``act(gate) * linear`` with ``gate, linear = (x + bias).chunk(2, -1)``: [..., 2n] -> [..., n]."""
    gate, linear = (x + bias if bias is not None else x).chunk(2, dim=-1)
    return _GATED_ACTIVATIONS[activation](gate) * linear


def bias_dropout_add(x, bias, residual, p, training=True, keep_mask=None):
    """``residual + dropout(x + bias)``; ``keep_mask`` (bool, x's shape) fixes which elements survive."""
    y = x + bias if bias is not None else x
    if training and p > 0:
        if keep_mask is None:
            keep_mask = torch.rand_like(y, dtype=torch.float32) >= p
        y = y * keep_mask.to(y.dtype) / (1 - p)
    return residual + y


def layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x, weight, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def scaled_masked_softmax(scores, mask, scale):
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    s = s * scale
    if mask is not None:
        s = s.masked_fill(mask, float("-inf"))
    probs = torch.softmax(s, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with every key excluded
    return probs.to(scores.dtype)


def causal_mask(sq: int, sk: int, window: int | None = None, device=None) -> torch.Tensor:
    """Bool ``[sq, sk]``, True = excluded: key j is visible to query i iff
    ``i + (sk - sq) - window < j <= i + (sk - sq)``."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    excluded = j > i
    if window is not None:
        excluded |= j <= i - window
    return excluded


def scaled_causal_softmax(scores, scale, window=None):
    sq, sk = scores.shape[-2:]
    return scaled_masked_softmax(scores, causal_mask(sq, sk, window, scores.device), scale)


def scaled_bias_softmax(scores, bias, mask=None, scale=1.0, causal=False, window=None):
    """softmax(scale * scores + bias) in fp32 (fp64 for fp64) with the keys excluded by ``mask`` (True =
    excluded) and, when ``causal``, by :func:`causal_mask`; rows with no visible key are zeros."""
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(acc) * scale + bias.to(acc)
    excluded = mask
    if causal:
        sq, sk = scores.shape[-2:]
        c = causal_mask(sq, sk, window, scores.device)
        excluded = c if excluded is None else excluded | c
    if excluded is not None:
        s = s.masked_fill(excluded, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)  # rows with every key excluded
    return probs.to(scores.dtype)


def rotate_half(u):
    h = u.shape[-1] // 2
    return torch.cat([-u[..., h:], u[..., :h]], dim=-1)


def apply_rotary_emb(x, cos, sin):
    """x ``[seq, ..., head_dim]``, cos/sin ``[seq, rotary_dim]``."""
    r = cos.shape[-1]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (r,)
    c, s = cos.reshape(shape).to(x.dtype), sin.reshape(shape).to(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * c + rotate_half(rot) * s, rest], dim=-1)


def cross_entropy(logits, target, ignore_index=-100):
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float() if logits.dtype != torch.float64 else logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1).long(),
        ignore_index=ignore_index,
        reduction="none",
    )
    return loss.reshape(target.shape)


def vocab_parallel_cross_entropy_stats(logits, target, vocab_start, ignore_index=-100):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lf = logits.to(acc)
    local_max = lf.max(dim=-1).values
    sum_exp = torch.exp(lf - local_max.unsqueeze(-1)).sum(dim=-1)
    local = target.long() - vocab_start
    in_shard = (local >= 0) & (local < logits.shape[-1]) & (target != ignore_index)
    picked = lf.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return local_max, sum_exp, torch.where(in_shard, picked, torch.zeros_like(picked))
