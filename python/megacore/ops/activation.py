"""Fused bias + activation: GeLU and ReLU, and the gated linear units GeGLU, SwiGLU and ReGLU. Each op's
backward is one pass too, the bias gradient fused in."""

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


def bias_relu(x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(x + bias)`` in one pass; its backward is one pass too, the bias gradient fused in. The
    gradient at ``x + bias == 0`` is 0, as ``torch.relu``'s.

    Args:
        x: ``[..., hidden]``, float32 / float64 / float16 / bfloat16, any strides.
        bias: ``[hidden]`` of x's dtype and device, or None.

    Returns:
        ``[..., hidden]`` of x's dtype, computed in fp32 (fp64 for fp64).

    Raises:
        ValueError: bias of the wrong length or rank, x of rank 0.
        TypeError: a non-float dtype, or bias of another dtype than x.
    """
    return _lib.bias_relu(x, bias)


def bias_gated(x: torch.Tensor, bias: torch.Tensor | None = None, activation: str = "swiglu") -> torch.Tensor:
    """A gated linear unit with its bias, in one pass: ``act(x1 + b1) * (x2 + b2)``, where
    ``x1 = x[..., :n]`` is the gate half and ``x2 = x[..., n:]`` the linear half (Megatron's and
    Hugging Face's order: one fc1 whose output is the gate then the up projection), and ``b1``, ``b2``
    the halves of ``bias``. Its backward is one pass too, the bias gradient fused in.

    Args:
        x: ``[..., 2n]``, float32 / float64 / float16 / bfloat16, any strides.
        bias: ``[2n]`` of x's dtype and device, or None.
        activation: ``"swiglu"`` (SiLU, LLaMA), ``"geglu"`` (GeLU, tanh approximation: T5 v1.1's
            ``gelu_new``), ``"geglu_erf"`` (exact erf GeLU) or ``"reglu"`` (ReLU).

    Returns:
        ``[..., n]`` of x's dtype, computed in fp32 (fp64 for fp64).

    Raises:
        ValueError: an odd last dim of x, bias of the wrong length or rank, an unknown ``activation``,
            x of rank 0.
        TypeError: a non-float dtype, or bias of another dtype than x.
    """
    return _lib.bias_gated(x, bias, activation)


# ---- fake kernels (torch.compile, meta tensors) ----------------------------------------------------------


def _grad_bias_like(x, bias):
    return x.new_empty((x.shape[-1],) if bias is not None else (0,))


@torch.library.register_fake("megacore::bias_gelu")
def _bias_gelu_fake(x, bias, approximate="tanh"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::bias_gelu_backward")
def _bias_gelu_backward_fake(grad_out, x, bias, approximate):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _grad_bias_like(x, bias)


@torch.library.register_fake("megacore::bias_relu")
def _bias_relu_fake(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::bias_relu_backward")
def _bias_relu_backward_fake(grad_out, x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _grad_bias_like(x, bias)


@torch.library.register_fake("megacore::bias_gated")
def _bias_gated_fake(x, bias, activation):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))  # [..., n]


@torch.library.register_fake("megacore::bias_gated_backward")
def _bias_gated_backward_fake(grad_out, x, bias, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _grad_bias_like(x, bias)


# ---- autograd: each backward is the op's backward op ---------------------------------------------------


def _save_x_and_bias(ctx, inputs, output):
    x, bias, *args = inputs  # args: bias_gelu's approximate, bias_gated's activation, or nothing
    ctx.save_for_backward(x, bias)
    ctx.args = args


def _backward_with(backward_op):
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        grad_x, grad_bias = backward_op(grad_out, x, bias, *ctx.args)
        return grad_x, (grad_bias if bias is not None else None), *(None for _ in ctx.args)

    return backward


for _op in ("bias_gelu", "bias_relu", "bias_gated"):
    torch.library.register_autograd(
        f"megacore::{_op}", _backward_with(getattr(_lib, f"{_op}_backward")), setup_context=_save_x_and_bias
    )
