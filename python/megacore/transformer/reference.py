"""The transformer layer composed in Python from ``megacore.ops``, torch and the tensor-parallel mappings:
the reference the C++ layer (``megacore.transformer.layer``) is tested against.

Same math, same parameters, same dropout masks (the same ops with the seeds of
:func:`megacore.transformer.layer.dropout_seed`), but every step is a separate differentiable call and
autograd derives the backward, so it shares no backward code with the C++ layer.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megacore import ops
from megacore.parallel.mappings import (
    _rank_and_size,
    _sp_gather,
    _sp_reduce_scatter,
    _tp_copy,
    _tp_reduce,
)
from megacore.transformer.config import TransformerConfig
from megacore.transformer.layer import dropout_seed

_lib = torch.ops.megacore


def transformer_layer_reference(
    hidden: torch.Tensor,
    params: dict[str, Optional[torch.Tensor]],
    config: TransformerConfig,
    attention_mask: Optional[torch.Tensor] = None,
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    seed: int = 0,
    group_name: str = "",
    training: bool = True,
) -> torch.Tensor:
    """The layer of :func:`megacore.transformer.layer.transformer_layer`, composed in Python.

    Arguments as there, except ``seed`` is a Python int. Under sequence parallelism the gradients of the
    replicated parameters used on the shard (norms, row-parallel biases) are this rank's part, as the C++
    layer's: ``megacore.parallel.sum_sequence_parallel_gradients`` sums them.
    """
    tp_size, tp_rank = _group(group_name)
    sp = config.sequence_parallel and tp_size > 1
    p_attn = config.attention_dropout if training else 0.0
    p_hidden = config.hidden_dropout if training else 0.0
    residual_rank = tp_rank if config.sequence_parallel else 0

    def param(name: str):
        return params.get(name)

    def norm(x, prefix):
        w, b = param(prefix + ".weight"), param(prefix + ".bias")
        if config.normalization == "layernorm":
            return ops.layer_norm(x, w, b, config.norm_epsilon)
        return ops.rms_norm(x, w, config.norm_epsilon)

    def enter(x):  # into the tensor-parallel region, before a column-parallel GEMM
        if tp_size == 1:
            return x
        return _sp_gather(x, group_name) if sp else _tp_copy(x, group_name)

    def leave(x):  # out of it, after a row-parallel GEMM
        if tp_size == 1:
            return x
        return _sp_reduce_scatter(x, group_name) if sp else _tp_reduce(x, group_name)

    def seed_of(site: int, rank: int) -> torch.Tensor:
        return torch.tensor([dropout_seed(seed, site, rank)], dtype=torch.int64)

    x = hidden
    attn_in = norm(x, "attention_norm") if config.pre_norm else x
    qkv = F.linear(enter(attn_in), params["attention.qkv.weight"], params.get("attention.qkv.bias"))
    s, b = qkv.shape[:2]
    d = config.head_dim
    heads = qkv.shape[-1] // (3 * d)
    q, k, v = qkv.view(s, b, heads, 3, d).unbind(3)  # each [s, b, heads, d]
    if rotary is not None:
        q, k = ops.apply_rotary_emb(q, *rotary), ops.apply_rotary_emb(k, *rotary)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    scale = 1.0 / math.sqrt(d)
    scores = q @ k.transpose(-2, -1)  # [b, heads, s, s]
    kind = config.attention_mask_type
    if kind in ("causal", "sliding_window"):
        probs = ops.scaled_causal_softmax(scores, scale, config.window_size)
    else:
        probs = ops.scaled_masked_softmax(scores, attention_mask if kind == "padding" else None, scale)
    if p_attn > 0:
        probs = _lib.bias_dropout_add(probs, None, torch.zeros_like(probs), p_attn, seed_of(0, tp_rank))
    context = (probs @ v).permute(2, 0, 1, 3).reshape(s, b, heads * d)  # [s, b, heads * d]
    attn = leave(F.linear(context, params["attention.proj.weight"]))
    res1 = _lib.bias_dropout_add(attn, param("attention.proj.bias"), x, p_hidden, seed_of(1, residual_rank))
    mlp_in = norm(res1, "mlp_norm" if config.pre_norm else "attention_norm")
    fc1 = F.linear(enter(mlp_in), params["mlp.fc1.weight"])
    act = ops.bias_gelu(fc1, params.get("mlp.fc1.bias"), "none" if config.activation == "gelu" else "tanh")
    mlp = leave(F.linear(act, params["mlp.fc2.weight"]))
    out = _lib.bias_dropout_add(mlp, param("mlp.fc2.bias"), res1 if config.pre_norm else mlp_in, p_hidden,
                                seed_of(2, residual_rank))
    return out if config.pre_norm else norm(out, "mlp_norm")


def _group(group_name: str) -> tuple[int, int]:
    """(size, rank) of the tensor-parallel group; (1, 0) without one."""
    if not group_name:
        return 1, 0
    rank, size = _rank_and_size("transformer_layer_reference", group_name)
    return size, rank


__all__ = ["transformer_layer_reference"]
