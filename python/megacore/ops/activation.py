"""Fused bias + activation (so far GeLU)."""

from __future__ import annotations

import torch

_lib = torch.ops.megacore


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(x + bias)`` in one pass; its backward is one pass too, the bias gradient fused in.

    Args:
        x: ``[..., hidden]``, float32 / float64 / float16 / bfloat16, any strides.
        bias: ``[hidden]`` of x's dtype and device, or None.
        approximate: ``"tanh"`` (GPT-2 / Megatron) or ``"none"`` (exact erf), as in
            ``torch.nn.functional.gelu``.

    Returns:
        ``[..., hidden]`` of x's dtype, computed in fp32 (fp64 for fp64).

    Raises:
        ValueError: bias of the wrong length or rank, unknown ``approximate``, x of rank 0.
        TypeError: a non-float dtype, or bias of another dtype than x.
    """
    return _lib.bias_gelu(x, bias, approximate)


@torch.library.register_fake("megacore::bias_gelu")
def _bias_gelu_fake(x, bias, approximate="tanh"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::bias_gelu_backward")
def _bias_gelu_backward_fake(grad_out, x, bias, approximate):
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_bias = x.new_empty((x.shape[-1],) if bias is not None else (0,))
    return grad_x, grad_bias


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = _lib.bias_gelu_backward(grad_out, x, bias, ctx.approximate)
    return grad_x, (grad_bias if bias is not None else None), None


torch.library.register_autograd("megacore::bias_gelu", _backward, setup_context=_setup_context)
