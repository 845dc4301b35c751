"""Rotary position embedding (RoPE)."""

from __future__ import annotations

import torch

_lib = torch.ops.megacore


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first ``rotary_dim`` features of each head by position; the rest pass through.

    Layout (Megatron's): ``x`` is ``[seq, ..., head_dim]``, sequence first (``[seq, batch, heads,
    head_dim]`` in megacore's transformer); ``cos`` and ``sin`` are ``[seq, rotary_dim]`` with
    ``rotary_dim`` even and ``<= head_dim``. Pairing is rotate-half (GPT-NeoX / Llama / Hugging Face):
    feature ``k`` pairs with ``k + rotary_dim / 2``::

        out[..., :r] = x[..., :r] * cos + rotate_half(x[..., :r]) * sin
        rotate_half(u) = cat(-u[..., r/2:], u[..., :r/2])
        out[..., r:] = x[..., r:]

    so ``cos``/``sin`` are the usual ``cat(freqs, freqs)`` tables (see
    ``megacore.ops.rotary_tables``). For batch-first ``[batch, seq, ...]`` input, pass
    ``x.transpose(0, 1)``. cos/sin are constants: they get no gradient. Computed in fp32 (fp64 for
    fp64); cos/sin may be float32 whatever x's dtype.

    Raises:
        ValueError: rank < 2, cos/sin not ``[seq, rotary_dim]``, odd or too large ``rotary_dim``.
        TypeError: non-float dtypes.
    """
    return _lib.apply_rotary_emb(x, cos, sin)


def rotary_tables(
    seq_len: int, rotary_dim: int, base: float = 10000.0, device=None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` tables ``[seq_len, rotary_dim]`` for :func:`apply_rotary_emb`:
    angle ``pos * base ** (-2k / rotary_dim)`` for ``k < rotary_dim / 2``, repeated for both halves."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"megacore.rotary_tables: rotary_dim is {rotary_dim}, expected a positive even number")
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@torch.library.register_fake("megacore::apply_rotary_emb")
def _rotary_fake(x, cos, sin):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::apply_rotary_emb_backward")
def _rotary_backward_fake(grad_out, cos, sin):
    return torch.empty_like(grad_out, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, grad_out):
    cos, sin = ctx.saved_tensors
    return _lib.apply_rotary_emb_backward(grad_out, cos, sin), None, None


torch.library.register_autograd("megacore::apply_rotary_emb", _backward, setup_context=_setup_context)
