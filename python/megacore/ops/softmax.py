"""Scaled softmax over attention scores with padding, causal or sliding-window masking."""

from __future__ import annotations

import torch

_lib = torch.ops.megacore


def scaled_masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``softmax(scale * scores)`` over the last dim, with positions where ``mask`` is True excluded.

    Megatron's convention: **True marks a position to exclude**. A row whose every key is excluded gives
    zeros (never NaN), and so does its gradient. Computed in fp32 (fp64 for fp64); only the
    probabilities are kept for backward.

    Args:
        scores: ``[b, h, sq, sk]`` (any rank >= 2 works: ``[..., sq, sk]``), float dtypes.
        mask: bool, broadcastable to scores (typically ``[b, 1, sq, sk]``), or None.
        scale: multiplies the scores before the softmax (e.g. ``1 / sqrt(head_dim)``).

    Returns:
        scores' shape and dtype.

    Raises:
        ValueError: a mask that does not broadcast to scores.
        TypeError: a non-bool mask or a non-float scores dtype.
    """
    return _lib.scaled_masked_softmax(scores, mask, float(scale))


def scaled_causal_softmax(scores: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """``softmax(scale * scores)`` with causal (upper-triangular) masking, optionally sliding-window.

    Queries are aligned to the end of the keys: query ``i`` of ``sq`` sees keys
    ``j <= i + (sk - sq)``; with ``window=w`` only the last ``w`` of those,
    ``i + (sk - sq) - w < j`` (local attention). With ``sq == sk`` this is the usual lower triangle.

    Args:
        scores: ``[..., sq, sk]`` with ``sq <= sk``, float dtypes.
        scale: multiplies the scores before the softmax.
        window: keys each query sees, >= 1, or None for unlimited.

    Returns:
        scores' shape and dtype; rows that see no key are zeros.

    Raises:
        ValueError: rank < 2, ``sq > sk``, ``window < 1``.
        TypeError: a non-float dtype.
    """
    return _lib.scaled_causal_softmax(scores, float(scale), window)


@torch.library.register_fake("megacore::scaled_masked_softmax")
def _masked_fake(scores, mask, scale):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::scaled_causal_softmax")
def _causal_fake(scores, scale, window=None):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::scaled_softmax_backward")
def _backward_fake(grad_out, probs, scale):
    return torch.empty_like(probs, memory_format=torch.contiguous_format)


def _masked_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.scale = inputs[2]


def _masked_backward(ctx, grad_out):
    (probs,) = ctx.saved_tensors
    return _lib.scaled_softmax_backward(grad_out, probs, ctx.scale), None, None


def _causal_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.scale = inputs[1]


def _causal_backward(ctx, grad_out):
    (probs,) = ctx.saved_tensors
    return _lib.scaled_softmax_backward(grad_out, probs, ctx.scale), None, None


torch.library.register_autograd("megacore::scaled_masked_softmax", _masked_backward, setup_context=_masked_setup)
torch.library.register_autograd("megacore::scaled_causal_softmax", _causal_backward, setup_context=_causal_setup)
