"""Scaled softmax over attention scores with padding, causal or sliding-window masking, and with an
additive attention bias (T5's relative positions, ALiBi)."""

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


def scaled_bias_softmax(
    scores: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """``softmax(scale * scores + bias)`` over the last dim: an additive attention bias (T5's learned
    relative-position bias, ALiBi), with optional padding and causal (sliding-window) masking.

    Excluded keys follow :func:`scaled_masked_softmax` (``mask``: **True = excluded**) and
    :func:`scaled_causal_softmax` (``causal``: query ``i`` sees keys ``j <= i + (sk - sq)``, with
    ``window=w`` only the last ``w`` of those); both may be given and both exclude. A row whose every
    key is excluded gives zeros (never NaN), and zero gradients. Computed in fp32 (fp64 for fp64); only
    the probabilities are kept for backward. Gradients flow to ``scores`` and ``bias`` (summed over the
    bias's broadcast dims), none to ``mask``.

    Args:
        scores: ``[b, h, sq, sk]``, float32, float64, float16 or bfloat16.
        bias: scores' dtype and device, 4 dims, each 1 or scores' size: ``[1, h, sq, sk]`` (T5),
            ``[b, h, sq, sk]``, ``[1, h, 1, sk]`` (ALiBi-like), ...
        mask: bool, broadcastable to scores (typically ``[b, 1, sq, sk]`` or ``[b, 1, 1, sk]``), or None.
        scale: multiplies the scores (not the bias) before the softmax (e.g. ``1 / sqrt(head_dim)``).
        causal: causal masking, queries aligned to the end of the keys (needs ``sq <= sk``).
        window: with ``causal``, keys each query sees, >= 1, or None for unlimited.

    Returns:
        scores' shape and dtype.

    Raises:
        ValueError: scores not 4-D; a bias shape with a dim that is neither 1 nor scores' size; a mask
            that does not broadcast to scores; ``window`` without ``causal``; ``window < 1``; ``sq > sk``
            with ``causal``; bias or mask on another device.
        TypeError: a bias dtype other than scores'; a non-bool mask; a non-float scores dtype.
    """
    return _lib.scaled_bias_softmax(scores, bias, mask, float(scale), bool(causal), window)


@torch.library.register_fake("megacore::scaled_masked_softmax")
def _masked_fake(scores, mask, scale):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::scaled_causal_softmax")
def _causal_fake(scores, scale, window=None):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::scaled_softmax_backward")
def _backward_fake(grad_out, probs, scale):
    return torch.empty_like(probs, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::scaled_bias_softmax")
def _bias_fake(scores, bias, mask, scale, causal=False, window=None):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::scaled_bias_softmax_backward")
def _bias_backward_fake(grad_out, probs, scale, bias_shape):
    return torch.empty_like(probs, memory_format=torch.contiguous_format), probs.new_empty(bias_shape)


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


def _bias_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.scale = inputs[3]
    ctx.bias_shape = list(inputs[1].shape)


def _bias_backward(ctx, grad_out):
    (probs,) = ctx.saved_tensors
    grad_scores, grad_bias = _lib.scaled_bias_softmax_backward(grad_out, probs, ctx.scale, ctx.bias_shape)
    return grad_scores, grad_bias, None, None, None, None


torch.library.register_autograd("megacore::scaled_bias_softmax", _bias_backward, setup_context=_bias_setup)
