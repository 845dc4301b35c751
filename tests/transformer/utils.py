"""Helpers shared by the transformer-layer tests (single-process and tensor-parallel)."""

from __future__ import annotations

from typing import Optional

import torch

from megacore.transformer import TransformerConfig, TransformerLayer, transformer_layer
from megacore.transformer.reference import transformer_layer_reference

# Largest difference allowed, relative to the largest magnitude of the expected tensor. The C++ layer and
# the reference run the same kernels in a different grouping (batched vs. per-call GEMMs, fused vs.
# autograd-summed bias gradients), so low-precision results differ by a few roundings.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 6e-3}


def make_mask(config: TransformerConfig, batch: int, seq: int) -> Optional[torch.Tensor]:
    """A padding mask [batch, 1, 1, seq] (True = masked): sequence i has its last i % 3 positions padded;
    None for the other mask kinds. Deterministic, so every rank builds the same one."""
    if config.attention_mask_type != "padding":
        return None
    mask = torch.zeros(batch, 1, 1, seq, dtype=torch.bool)
    for i in range(batch):
        pad = i % 3
        if pad:
            mask[i, ..., seq - pad:] = True
    return mask


def make_extras(config: TransformerConfig, batch: int, seq: int, memory_len: int = 5, tp_rank: int = 0,
                tp_size: int = 1, memory_chunk: bool = False) -> dict:
    """The layer's other inputs for ``config``, deterministic (every rank builds the same, then takes its part):
    ``attention_bias [1, heads / tp, seq, seq]`` (this rank's heads) with ``config.attention_bias``; ``memory``
    ``[memory_len, batch, hidden]`` (its sequence chunk with ``memory_chunk``) and ``memory_mask [batch, 1, 1,
    memory_len]`` (sequence i has its last i % 2 memory positions masked) with ``config.cross_attention``."""
    gen = torch.Generator().manual_seed(17)
    dtype = config.params_dtype
    extras = {}
    heads = config.num_attention_heads
    if config.attention_bias:
        bias = torch.randn(1, heads, seq, seq, generator=gen).to(dtype)
        per = heads // tp_size
        extras["attention_bias"] = bias[:, tp_rank * per:(tp_rank + 1) * per].contiguous()
    if config.cross_attention:
        memory = torch.randn(memory_len, batch, config.hidden_size, generator=gen).to(dtype)
        if memory_chunk:
            chunk = memory_len // tp_size
            memory = memory[tp_rank * chunk:(tp_rank + 1) * chunk].contiguous()
        mask = torch.zeros(batch, 1, 1, memory_len, dtype=torch.bool)
        for i in range(batch):
            if i % 2:
                mask[i, ..., memory_len - 1:] = True
        extras.update(memory=memory, memory_mask=mask)
    return extras


def _differentiable_extras(extras: Optional[dict]) -> tuple[dict, list[torch.Tensor]]:
    """(the extras with attention_bias and memory as fresh leaves that require grad, those leaves)."""
    extras = dict(extras or {})
    leaves = []
    for name in ("attention_bias", "memory"):
        if name in extras:
            extras[name] = extras[name].detach().clone().requires_grad_()
            leaves.append(extras[name])
    return extras, leaves


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)  # on CPU: the same gradient whatever the device
    grad_out = torch.randn(out.shape, generator=gen).to(device=out.device, dtype=out.dtype)
    return list(torch.autograd.grad(out, inputs, grad_out))


def run_layer(layer: TransformerLayer, x: torch.Tensor, mask, seed: int, extras: Optional[dict] = None):
    """The C++ layer's output and gradients (input first, then the parameters in module order, then the
    attention bias's and the memory's when ``extras`` (:func:`make_extras`) has them) for a fixed random output
    gradient."""
    x = x.detach().clone().requires_grad_()
    extras, leaves = _differentiable_extras(extras)
    rotary = layer.rotary_tables(layer.full_seq_len(x), x.device)
    out = transformer_layer(x, layer.layer_params(), layer.config, mask, rotary, torch.tensor([seed]),
                            layer.group_name, layer.training, **extras)
    return out.detach(), _grads(out, [x, *layer.parameters(), *leaves], seed)


def run_reference(layer: TransformerLayer, x: torch.Tensor, mask, seed: int, extras: Optional[dict] = None):
    """Same as run_layer, with the Python reference composition."""
    x = x.detach().clone().requires_grad_()
    extras, leaves = _differentiable_extras(extras)
    rotary = layer.rotary_tables(layer.full_seq_len(x), x.device)
    out = transformer_layer_reference(x, layer.layer_params(), layer.config, mask, rotary, seed, layer.group_name,
                                      layer.training, **extras)
    return out.detach(), _grads(out, [x, *layer.parameters(), *leaves], seed)


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    scale = max(e.abs().max().item(), 1e-6)
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= RELATIVE_TOLERANCE[dtype] * scale, (
        f"{what}: max |difference| {err:.3g} > {RELATIVE_TOLERANCE[dtype]:g} * max |expected| {scale:.3g}")


def assert_layer_close(out, grads, ref_out, ref_grads, dtype, names=None):
    names = names or ["hidden"] + [f"grad {i}" for i in range(1, len(grads))]
    assert_close_relative(out, ref_out, dtype, "output")
    assert len(grads) == len(ref_grads)
    for name, g, r in zip(["grad hidden"] + list(names[1:]), grads, ref_grads):
        assert_close_relative(g, r, dtype, name)
