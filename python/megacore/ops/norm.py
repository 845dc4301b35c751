"""LayerNorm and RMSNorm over the last dim, statistics in fp32."""

from __future__ import annotations

import torch

from megacore.ops._common import acc_dtype

_lib = torch.ops.megacore


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim, any hidden size.

    Mean and variance are computed in fp32 (fp64 for fp64 input) and saved, with the input, for a
    one-pass backward that gives the gradients of x, weight and bias.

    Args:
        x: ``[..., hidden]``, float32 / float64 / float16 / bfloat16.
        weight, bias: ``[hidden]`` of x's dtype, or None.
        eps: added to the variance, > 0 is usual (0 allowed).

    Returns:
        x's shape and dtype.

    Raises:
        ValueError: weight/bias of the wrong length, eps < 0, x of rank 0.
        TypeError: mismatched or non-float dtypes.
    """
    out, _, _ = _lib.layer_norm(x, weight, bias, float(eps))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (as ``torch.nn.functional.rms_norm``).

    Args:
        x: ``[..., hidden]``, float32 / float64 / float16 / bfloat16.
        weight: ``[hidden]`` of x's dtype, or None.
        eps: added to the mean square.

    Returns:
        x's shape and dtype.

    Raises:
        ValueError: weight of the wrong length, eps < 0, x of rank 0.
        TypeError: mismatched or non-float dtypes.
    """
    out, _ = _lib.rms_norm(x, weight, float(eps))
    return out


@torch.library.register_fake("megacore::layer_norm")
def _layer_norm_fake(x, weight, bias, eps):
    stats = x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@torch.library.register_fake("megacore::layer_norm_backward")
def _layer_norm_backward_fake(grad_out, x, weight, mean, rstd, has_bias):
    hidden = x.shape[-1]
    grad_weight = x.new_empty((hidden,) if weight is not None else (0,))
    grad_bias = x.new_empty((hidden,) if has_bias else (0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_weight, grad_bias


@torch.library.register_fake("megacore::rms_norm")
def _rms_norm_fake(x, weight, eps):
    rstd = x.new_empty(x.shape[:-1], dtype=acc_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), rstd


@torch.library.register_fake("megacore::rms_norm_backward")
def _rms_norm_backward_fake(grad_out, x, weight, rstd):
    grad_weight = x.new_empty((x.shape[-1],) if weight is not None else (0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_weight


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _layer_norm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = _lib.layer_norm_backward(grad_out, x, weight, mean, rstd, ctx.has_bias)
    return (
        grad_x,
        grad_weight if ctx.has_weight else None,
        grad_bias if ctx.has_bias else None,
        None,
    )


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)
    ctx.has_weight = weight is not None


def _rms_norm_backward(ctx, grad_out, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = _lib.rms_norm_backward(grad_out, x, weight, rstd)
    return grad_x, (grad_weight if ctx.has_weight else None), None


torch.library.register_autograd("megacore::layer_norm", _layer_norm_backward, setup_context=_layer_norm_setup)
torch.library.register_autograd("megacore::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)
