"""Unsharded megacore tensors <-> a model's (tensor-parallel) parameters, through the one gather/scatter of
megacore.parallel.sharding (the checkpoints use it too).

``load_full_state`` gives a model built on the meta device this rank's shards of full tensors;
``full_state`` all-gathers a model's shards back into full tensors. Which parameters are sharded, along
which dim, and which are vocab tables (padded with zero rows to a multiple of the tensor-parallel size on
the way in, cut back on the way out) is megacore.parallel.sharding's ``param_shards``.
"""

from __future__ import annotations

import torch
from torch import nn

from megacore.models.common import tensor_parallel_world
from megacore.parallel.sharding import gather_full, param_shards, shard_of


def load_full_state(model: nn.Module, full: dict[str, torch.Tensor], device, fn: str) -> nn.Module:
    """Replaces every parameter of ``model`` (built on the meta device) by this rank's shard of
    ``full[name]`` (the unsharded, unpadded tensor), on ``device`` in the parameter's dtype, keeping the
    parameter's megacore attributes. Raises ValueError naming ``fn`` and the tensor for a missing,
    unexpected or wrongly shaped one."""
    _, rank, world = tensor_parallel_world(model.config, type(model).__name__)
    shards = {id(s.param): s for s in param_shards(model, world)}
    names = {s.name for s in shards.values()}
    missing, unexpected = sorted(names - set(full)), sorted(set(full) - names)
    if missing or unexpected:
        raise ValueError(f"megacore.interop.hf.{fn}: tensors do not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) in replaced:  # a parameter shared by two modules stays shared
                setattr(module, name, replaced[id(p)])
                continue
            shard = shards[id(p)]
            t = shard_of(shard, full[shard.name], rank)
            if t is None:
                raise ValueError(f"megacore.interop.hf.{fn}: {shard.name} has shape {list(full[shard.name].shape)}, "
                                 f"the model expects {shard.full_shape()}"
                                 + (f" (this rank's shard {list(p.shape)} of {world})" if shard.dim is not None else ""))
            # the placement is the module's declaration: a new Parameter under the same name keeps it
            new = nn.Parameter(t.to(device=device, dtype=p.dtype).clone(), requires_grad=p.requires_grad)
            replaced[id(p)] = new
            setattr(module, name, new)
    return model


@torch.no_grad()
def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` unsharded and unpadded (a collective under tensor parallelism: every
    rank of the tensor-parallel group must call it): name -> tensor, in the parameters' dtype and device."""
    group, _, world = tensor_parallel_world(model.config, type(model).__name__)
    return {s.name: gather_full(s, s.param, group) for s in param_shards(model, world)}


__all__ = ["full_state", "load_full_state"]
