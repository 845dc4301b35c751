"""Collectives as torch ops (``torch.ops.megacore.all_reduce / all_gather / reduce_scatter``).

The C++ ops (cpp/parallel/collectives.cpp) take the process group by its registered name, so they
work in eager and under ``torch.compile(fullgraph=True)``. They are out-of-place, have no autograd
formula (see :mod:`megacore.parallel.mappings` for the differentiable tensor-parallel mappings), and
wait for the collective at most the group's timeout (300 s when the backend does not expose one), so
a rank that skips a collective makes its peers raise instead of hang.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.distributed as dist

import megacore  # noqa: F401  (loads megacore._C: registers the ops)

GroupLike = Union[dist.ProcessGroup, str, None]


def group_name_of(group: GroupLike) -> str:
    """The registered name of ``group``: a ProcessGroup, a name (returned as is), or None (the default group)."""
    if isinstance(group, str):
        return group
    if group is None:
        group = dist.group.WORLD
    return group.group_name


def _world_size(op: str, group_name: str) -> int:
    """Size of the group registered as ``group_name``; ValueError naming the op if there is none."""
    try:
        return dist.distributed_c10d._resolve_process_group(group_name).size()
    except Exception as e:  # noqa: BLE001 - re-raised with the op's name
        raise ValueError(
            f"megacore.{op}: group_name '{group_name}' names no registered process group "
            "(pass group.group_name of a live group)"
        ) from e


@torch.library.register_fake("megacore::all_reduce")
def _all_reduce_fake(x, group_name, reduce_op="sum"):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::all_gather")
def _all_gather_fake(x, dim, group_name):
    dim = dim % x.dim()
    shape = list(x.shape)
    shape[dim] *= _world_size("all_gather", group_name)
    return x.new_empty(shape)


@torch.library.register_fake("megacore::reduce_scatter")
def _reduce_scatter_fake(x, dim, group_name):
    dim = dim % x.dim()
    world = _world_size("reduce_scatter", group_name)
    shape = list(x.shape)
    torch._check(
        shape[dim] % world == 0,
        lambda: f"megacore.reduce_scatter: x has size {shape[dim]} along dim {dim}, "
        f"not divisible by the group size {world}",
    )
    shape[dim] //= world
    return x.new_empty(shape)


def all_reduce(x: torch.Tensor, group: GroupLike = None, reduce_op: str = "sum") -> torch.Tensor:
    """Out-of-place all-reduce of ``x`` over ``group``.

    Args:
        x: any shape; every rank passes the same shape and dtype.
        group: a ProcessGroup, its ``group_name``, or None for the default group.
        reduce_op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
    Returns: a new contiguous tensor of ``x``'s shape (not differentiable).
    """
    return torch.ops.megacore.all_reduce(x, group_name_of(group), reduce_op)


def all_gather(x: torch.Tensor, dim: int = 0, group: GroupLike = None) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order: ``[..., n, ...] -> [..., world*n, ...]``.

    ``group`` is a ProcessGroup, its ``group_name``, or None for the default group. Not differentiable.
    """
    return torch.ops.megacore.all_gather(x, dim, group_name_of(group))


def reduce_scatter(x: torch.Tensor, dim: int = 0, group: GroupLike = None) -> torch.Tensor:
    """Sum of ``x`` over ranks, then this rank's chunk along ``dim``: ``[..., world*n, ...] -> [..., n, ...]``.

    ``x.size(dim)`` must divide by the group size (ValueError otherwise). ``group`` is a ProcessGroup,
    its ``group_name``, or None for the default group. Not differentiable.
    """
    return torch.ops.megacore.reduce_scatter(x, dim, group_name_of(group))


__all__ = ["all_reduce", "all_gather", "reduce_scatter", "group_name_of"]
