"""Unsharded megacore tensors <-> a model's (tensor-parallel) parameters.

``load_full_state`` gives a model built on the meta device this rank's shards of full tensors;
``full_state`` all-gathers a model's shards back into full tensors. Which parameters are sharded, and
along which dim, is what the parameters say (``partition_dim``, set by megacore.parallel's layers and
the transformer layer); the vocab-dim parameters are padded with zero rows to a multiple of the
tensor-parallel size on the way in and cut back on the way out (``VocabParallelEmbedding``).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from megacore.models.common import tensor_parallel_world
from megacore.parallel.collectives import all_gather
from megacore.parallel.layers import merge_weights, split_weight

# The attributes megacore's parameters carry for checkpointing and gradient reduction.
_PARAM_ATTRIBUTES = ("tensor_parallel", "partition_dim", "sequence_parallel")


def _sharded(p: nn.Parameter, world: int) -> bool:
    return world > 1 and getattr(p, "tensor_parallel", False) and getattr(p, "partition_dim", None) is not None


def load_full_state(model: nn.Module, full: dict[str, torch.Tensor], vocab_params: Iterable[str], device,
                    fn: str) -> nn.Module:
    """Replaces every parameter of ``model`` (built on the meta device) by this rank's shard of
    ``full[name]`` (the unsharded tensor), on ``device`` in the parameter's dtype, keeping the
    parameter's megacore attributes. Raises ValueError naming ``fn`` and the tensor for a missing,
    unexpected or wrongly shaped one."""
    _, rank, world = tensor_parallel_world(model.config, type(model).__name__)
    vocab_params = set(vocab_params)
    names = dict(model.named_parameters())
    missing, unexpected = sorted(set(names) - set(full)), sorted(set(full) - set(names))
    if missing or unexpected:
        raise ValueError(f"megacore.interop.hf.{fn}: tensors do not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    replaced: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            qualified = f"{module_name}.{name}" if module_name else name
            if id(p) in replaced:  # a parameter shared by two modules stays shared
                setattr(module, name, replaced[id(p)])
                continue
            t = full[qualified]
            if _sharded(p, world):
                dim = p.partition_dim
                if qualified in vocab_params:  # zero rows up to the padded vocab; no id selects them
                    t = F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (0, p.shape[dim] * world - t.shape[dim]))
                if t.shape[dim] != p.shape[dim] * world:
                    raise ValueError(f"megacore.interop.hf.{fn}: {qualified} has shape {list(t.shape)}; the model's "
                                     f"shard is {list(p.shape)} of {world} along dim {dim}")
                t = split_weight(t, dim, rank, world)
            if t.shape != p.shape:
                raise ValueError(f"megacore.interop.hf.{fn}: {qualified} has shape {list(t.shape)}, the model "
                                 f"expects {list(p.shape)}")
            new = nn.Parameter(t.to(device=device, dtype=p.dtype).clone(), requires_grad=p.requires_grad)
            for attr in _PARAM_ATTRIBUTES:
                if hasattr(p, attr):
                    setattr(new, attr, getattr(p, attr))
            replaced[id(p)] = new
            setattr(module, name, new)
    return model


@torch.no_grad()
def full_state(model: nn.Module, vocab_params: Iterable[str], vocab_size: int) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` unsharded (a collective under tensor parallelism: every rank of the
    tensor-parallel group must call it), the vocab-dim ones cut to ``vocab_size`` rows:
    name -> tensor, in the parameters' dtype and device."""
    group, _, world = tensor_parallel_world(model.config, type(model).__name__)
    vocab_params = set(vocab_params)
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if _sharded(p, world):
            gathered = all_gather(t.unsqueeze(0).contiguous(), 0, group)  # [world, *shard]
            t = merge_weights(gathered.unbind(0), p.partition_dim)
        if name in vocab_params:
            t = t[:vocab_size]
        out[name] = t
    return out


__all__ = ["full_state", "load_full_state"]
