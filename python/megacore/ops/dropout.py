"""Fused residual + dropout(x + bias)."""

from __future__ import annotations

import torch

_lib = torch.ops.megacore


def bias_dropout_add(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    p: float,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``residual + dropout(x + bias, p)`` in one pass.

    The keep mask is a counter-based hash (Philox-4x32-10) of a 64-bit seed and each element's index:
    backward regenerates it from the seed, so no mask is stored. The seed is drawn from torch's CPU
    generator (``generator``, or the default one), so ``torch.manual_seed`` makes runs repeatable.
    With ``training=False`` or ``p == 0`` no element is dropped and the result is exactly
    ``residual + (x + bias)``.

    Args:
        x: ``[..., hidden]``, float32 / float64 / float16 / bfloat16.
        bias: ``[hidden]`` of x's dtype, or None.
        residual: x's shape, dtype and device.
        p: drop probability in [0, 1).

    Returns:
        x's shape and dtype.

    Raises:
        ValueError: p outside [0, 1), mismatched shapes, bias of the wrong length.
        TypeError: mismatched or non-float dtypes.
    """
    if not training:
        p = 0.0
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, generator=generator)
    return _lib.bias_dropout_add(x, bias, residual, float(p), seed)


@torch.library.register_fake("megacore::bias_dropout_add")
def _bias_dropout_add_fake(x, bias, residual, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::bias_dropout_add_backward")
def _bias_dropout_add_backward_fake(grad_out, p, seed, has_bias):
    grad_x = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
    grad_bias = grad_out.new_empty((grad_out.shape[-1],) if has_bias else (0,))
    return grad_x, grad_bias


def _setup_context(ctx, inputs, output):
    x, bias, residual, p, seed = inputs
    ctx.save_for_backward(seed)
    ctx.p = p
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    (seed,) = ctx.saved_tensors
    grad_x, grad_bias = _lib.bias_dropout_add_backward(grad_out, ctx.p, seed, ctx.has_bias)
    return grad_x, (grad_bias if ctx.has_bias else None), grad_out, None, None


torch.library.register_autograd("megacore::bias_dropout_add", _backward, setup_context=_setup_context)
