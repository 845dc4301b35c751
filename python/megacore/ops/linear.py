"""megacore's linear: ``x @ weight^T + bias``, with a CPU kernel for the few rows of decoding."""

from __future__ import annotations

from typing import Optional

import torch

from megacore import _C

_lib = torch.ops.megacore

SKINNY_LINEAR_MAX_ROWS: int = _C.SKINNY_LINEAR_MAX_ROWS
"""The most rows of ``x`` (the product of its leading dims) the skinny-linear CPU kernel takes (kernels/linear.h);
:func:`linear` uses it for fewer (see there)."""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [..., in] @ weight[out, in]^T (+ bias [out]) -> [..., out]``, as ``torch.nn.functional.linear``.

    With few rows of ``x`` on CPU (decoding: one token per sequence of a small batch) and a contiguous weight, it
    runs megacore's skinny-linear kernel, which streams the weight once at close to memory bandwidth where ATen's
    GEMM reaches half of it: from 4 to 15 rows in fp32, 1 to 4 in bf16, 1 to 8 in fp16, where it was measured
    faster (docs/benchmarks.md, "Skinny linear"); fp32 accumulation, one rounding per output. Anything else is
    ATen's linear. Differentiable (the backward is
    ATen's GEMMs); works under torch.compile.

    Raises:
        ValueError: ``weight`` not ``[out, x.size(-1)]``, ``bias`` not ``[out]``.
        TypeError: non-float dtypes, or ``weight``/``bias`` of another dtype than ``x``.
    """
    return _lib.linear(x, weight, bias)


@torch.library.register_fake("megacore::linear")
def _linear_fake(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad.matmul(weight)
    if ctx.needs_input_grad[1]:
        grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b


torch.library.register_autograd("megacore::linear", _backward, setup_context=_setup_context)
