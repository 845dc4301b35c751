"""The transformer layer composed in Python from ``megacore.ops``, torch and the tensor-parallel mappings:
the reference the C++ layer (``megacore.transformer.layer``) is tested against. Only tests and benchmarks import it.

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
from megacore.transformer.layer import DROPOUT_SITES, dropout_seed

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
    attention_bias: Optional[torch.Tensor] = None,
    memory: Optional[torch.Tensor] = None,
    memory_mask: Optional[torch.Tensor] = None,
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
    d = config.head_dim
    scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(d)

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

    def seed_of(site: str, rank: int) -> torch.Tensor:
        return torch.tensor([dropout_seed(seed, DROPOUT_SITES[site], rank)], dtype=torch.int64)

    def drop_probs(probs, site):
        if p_attn == 0:
            return probs
        return _lib.bias_dropout_add(probs, None, torch.zeros_like(probs), p_attn, seed_of(site, tp_rank))

    def heads(t):  # [n, b, heads * d] -> [b, heads, n, d]
        return t.view(t.shape[0], t.shape[1], -1, d).permute(1, 2, 0, 3)

    def merged(t):  # [b, heads, n, d] -> [n, b, heads * d]
        return t.permute(2, 0, 1, 3).reshape(t.shape[2], t.shape[0], -1)

    def self_attention(x):
        qkv = F.linear(enter(x), params["attention.qkv.weight"], param("attention.qkv.bias"))
        s, b = qkv.shape[:2]
        q, k, v = qkv.view(s, b, -1, 3, d).unbind(3)  # each [s, b, heads, d]
        if rotary is not None:
            q, k = ops.apply_rotary_emb(q, *rotary), ops.apply_rotary_emb(k, *rotary)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        scores = q @ k.transpose(-2, -1)  # [b, heads, s, s]
        kind = config.attention_mask_type
        causal = kind in ("causal", "sliding_window")
        mask = attention_mask if kind == "padding" else None
        if attention_bias is not None:
            probs = ops.scaled_bias_softmax(scores, attention_bias, mask, scale, causal, config.window_size)
        elif causal:
            probs = ops.scaled_causal_softmax(scores, scale, config.window_size)
        else:
            probs = ops.scaled_masked_softmax(scores, mask, scale)
        context = merged(drop_probs(probs, "attention") @ v)
        return leave(F.linear(context, params["attention.proj.weight"]))

    def cross_attention(x):
        q = heads(F.linear(enter(x), params["cross_attention.q.weight"], param("cross_attention.q.bias")))
        kv = F.linear(enter(memory), params["cross_attention.kv.weight"], param("cross_attention.kv.bias"))
        k, v = (t.permute(1, 2, 0, 3) for t in kv.view(kv.shape[0], kv.shape[1], -1, 2, d).unbind(3))
        probs = ops.scaled_masked_softmax(q @ k.transpose(-2, -1), memory_mask, scale)  # [b, heads, s, m]
        context = merged(drop_probs(probs, "cross_attention") @ v)
        return leave(F.linear(context, params["cross_attention.proj.weight"]))

    def mlp(x):
        fc1 = F.linear(enter(x), params["mlp.fc1.weight"])
        bias = param("mlp.fc1.bias")
        if config.activation in ("gelu", "gelu_tanh"):
            act = ops.bias_gelu(fc1, bias, "none" if config.activation == "gelu" else "tanh")
        elif config.activation == "relu":
            act = ops.bias_relu(fc1, bias)
        else:
            act = ops.bias_gated(fc1, bias, config.activation)
        return leave(F.linear(act, params["mlp.fc2.weight"]))

    def sub_block(x, body, norm_name, bias_name, site):
        # pre-LN: x + drop(body(norm(x)) + bias); post-LN: norm(x + drop(body(x) + bias))
        y = body(norm(x, norm_name) if config.pre_norm else x)
        out = _lib.bias_dropout_add(y, param(bias_name), x, p_hidden, seed_of(site, residual_rank))
        return out if config.pre_norm else norm(out, norm_name)

    x = sub_block(hidden, self_attention, "attention_norm", "attention.proj.bias", "after_attention")
    if config.cross_attention:
        x = sub_block(x, cross_attention, "cross_attention_norm", "cross_attention.proj.bias", "after_cross_attention")
    return sub_block(x, mlp, "mlp_norm", "mlp.fc2.bias", "after_mlp")


def _group(group_name: str) -> tuple[int, int]:
    """(size, rank) of the tensor-parallel group; (1, 0) without one."""
    if not group_name:
        return 1, 0
    rank, size = _rank_and_size("transformer_layer_reference", group_name)
    return size, rank


__all__ = ["transformer_layer_reference"]
