"""Megatron's tensor-parallel mappings, differentiable, on megacore's collective ops.

Each mapping is a ``torch.library.custom_op`` (``megacore::tp_*``) whose forward calls one collective
op and whose backward (``register_autograd``) calls its adjoint, so they work in eager and under
``torch.compile(fullgraph=True)``. ``group`` is the tensor-parallel ProcessGroup; with one rank every
mapping is the identity. Shapes: ``world`` is the group size; "chunk" is this rank's contiguous slice.

==========================================  ==========================  ==========================
mapping                                     forward                     backward
==========================================  ==========================  ==========================
copy_to_tensor_parallel_region              identity                    all-reduce (sum)
reduce_from_tensor_parallel_region          all-reduce (sum)            identity
scatter_to_tensor_parallel_region           keep chunk of last dim      all-gather last dim
gather_from_tensor_parallel_region          all-gather last dim         keep chunk of last dim
scatter_to_sequence_parallel_region         keep chunk of dim 0         all-gather dim 0
gather_from_sequence_parallel_region        all-gather dim 0            reduce-scatter dim 0
reduce_scatter_to_sequence_parallel_region  reduce-scatter dim 0        all-gather dim 0
==========================================  ==========================  ==========================
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megacore.parallel.collectives import _world_size, group_name_of

_ops = torch.ops.megacore


def _rank_and_size(op: str, group_name: str) -> tuple[int, int]:
    """This process's rank in the group registered as ``group_name``, and the group's size."""
    _world_size(op, group_name)  # a clear error for an unknown name
    pg = dist.distributed_c10d._resolve_process_group(group_name)
    return pg.rank(), pg.size()


def _keep_chunk(x: torch.Tensor, dim: int, group_name: str, op: str) -> torch.Tensor:
    """This rank's chunk of ``x`` along ``dim``: ``[..., world*n, ...] -> [..., n, ...]`` (a copy)."""
    rank, world = _rank_and_size(op, group_name)
    size = x.size(dim)
    if size % world != 0:
        raise ValueError(f"megacore.{op}: x has size {size} along dim {dim}, not divisible by the group size {world}")
    # clone, not contiguous(): with one rank the chunk is all of x, and a custom op may not return its input
    return x.narrow(dim, rank * (size // world), size // world).clone(memory_format=torch.contiguous_format)


def _chunk_fake(x: torch.Tensor, dim: int, group_name: str, op: str) -> torch.Tensor:
    world = _world_size(op, group_name)
    shape = list(x.shape)
    torch._check(shape[dim] % world == 0, lambda: f"megacore.{op}: size {shape[dim]} along dim {dim} not divisible by {world}")
    shape[dim] //= world
    return x.new_empty(shape)


# ---- the six mappings as custom ops -----------------------------------------------------------------


@torch.library.custom_op("megacore::tp_copy", mutates_args=())
def _tp_copy(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return x.clone()  # a custom op may not return its input


@torch.library.custom_op("megacore::tp_reduce", mutates_args=())
def _tp_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _ops.all_reduce(x, group_name, "sum")


@torch.library.custom_op("megacore::tp_scatter", mutates_args=())
def _tp_scatter(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _keep_chunk(x, x.dim() - 1, group_name, "scatter_to_tensor_parallel_region")


@torch.library.custom_op("megacore::tp_gather", mutates_args=())
def _tp_gather(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _ops.all_gather(x, -1, group_name)


@torch.library.custom_op("megacore::sp_scatter", mutates_args=())
def _sp_scatter(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _keep_chunk(x, 0, group_name, "scatter_to_sequence_parallel_region")


@torch.library.custom_op("megacore::sp_gather", mutates_args=())
def _sp_gather(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _ops.all_gather(x, 0, group_name)


@torch.library.custom_op("megacore::sp_reduce_scatter", mutates_args=())
def _sp_reduce_scatter(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _ops.reduce_scatter(x, 0, group_name)


@_tp_copy.register_fake
def _(x, group_name):
    return torch.empty_like(x)


@_tp_reduce.register_fake
def _(x, group_name):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_tp_scatter.register_fake
def _(x, group_name):
    return _chunk_fake(x, x.dim() - 1, group_name, "scatter_to_tensor_parallel_region")


@_tp_gather.register_fake
def _(x, group_name):
    return _ops.all_gather(x, -1, group_name)  # dispatches to the collective's fake


@_sp_scatter.register_fake
def _(x, group_name):
    return _chunk_fake(x, 0, group_name, "scatter_to_sequence_parallel_region")


@_sp_gather.register_fake
def _(x, group_name):
    return _ops.all_gather(x, 0, group_name)


@_sp_reduce_scatter.register_fake
def _(x, group_name):
    return _ops.reduce_scatter(x, 0, group_name)


def _save_group(ctx, inputs, output):
    ctx.group_name = inputs[1]


def _register(op, backward):
    op.register_autograd(lambda ctx, grad: (backward(grad, ctx.group_name), None), setup_context=_save_group)


# Each backward is the adjoint mapping (a differentiable op again, so double backward works too).
_register(_tp_copy, lambda g, name: _tp_reduce(g, name))
_register(_tp_reduce, lambda g, name: _tp_copy(g, name))
_register(_tp_scatter, lambda g, name: _tp_gather(g, name))
_register(_tp_gather, lambda g, name: _tp_scatter(g, name))
_register(_sp_scatter, lambda g, name: _sp_gather(g, name))
_register(_sp_gather, lambda g, name: _sp_reduce_scatter(g, name))
_register(_sp_reduce_scatter, lambda g, name: _sp_gather(g, name))


# ---- public API ---------------------------------------------------------------------------------


def copy_to_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Forward: identity (a copy). Backward: all-reduce (sum) of the gradient over ``group``."""
    return _tp_copy(x, group_name_of(group))


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Forward: all-reduce (sum) over ``group``. Backward: identity."""
    return _tp_reduce(x, group_name_of(group))


def scatter_to_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Forward: this rank's chunk of the last dim, ``[..., world*h] -> [..., h]``. Backward: all-gather of the last dim."""
    return _tp_scatter(x, group_name_of(group))


def gather_from_tensor_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Forward: all-gather of the last dim, ``[..., h] -> [..., world*h]``. Backward: this rank's chunk."""
    return _tp_gather(x, group_name_of(group))


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Forward: this rank's chunk of dim 0, ``[world*s, ...] -> [s, ...]``. Backward: all-gather of dim 0."""
    return _sp_scatter(x, group_name_of(group))


def gather_from_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Forward: all-gather of dim 0, ``[s, ...] -> [world*s, ...]``. Backward: reduce-scatter (sum) of dim 0."""
    return _sp_gather(x, group_name_of(group))


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Forward: reduce-scatter (sum) of dim 0, ``[world*s, ...] -> [s, ...]``. Backward: all-gather of dim 0."""
    return _sp_reduce_scatter(x, group_name_of(group))


__all__ = [
    "copy_to_tensor_parallel_region",
    "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region",
    "gather_from_tensor_parallel_region",
    "scatter_to_sequence_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
]
