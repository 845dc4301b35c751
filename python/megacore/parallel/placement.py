"""Where a parameter lies over the tensor-parallel group, declared by the module that creates it (see
megacore.parallel.sharding, which reads the declarations into the parallel plan). A module of its own so that
the layers that declare can import it without importing the plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


@dataclass(frozen=True)
class Placement:
    """How one parameter lies over the tensor-parallel group."""

    dim: Optional[int] = None  # sharded along this dim; None: replicated (every rank holds it whole)
    sequence_parallel: bool = False  # replicated, used on a sequence shard: each rank holds part of its gradient
    chunks: int = 1  # the sharded dim stacks this many pieces, each split over the ranks (a gated MLP's [gate; up])


REPLICATED = Placement()


def place(module: nn.Module, name: str, dim: Optional[int] = None, sequence_parallel: bool = False,
          chunks: int = 1) -> None:
    """Declares how ``module``'s parameter ``name`` lies over the tensor-parallel group: sharded along ``dim``
    (None: replicated), ``sequence_parallel`` for a replicated parameter used on sequence shards. ``chunks``: the
    full tensor stacks that many equal pieces along ``dim``, each split over the ranks, and a rank holds its part of
    each, stacked (Megatron's layout of a gated MLP's fc1, ``[gate; up]``). Undeclared parameters are replicated."""
    placements = module.__dict__.setdefault("_megacore_placements", {})
    placements[name] = Placement(dim, sequence_parallel, chunks)


def placement_of(module: nn.Module, name: str) -> Placement:
    """What ``place`` declared for ``module``'s parameter ``name`` (replicated when nothing was)."""
    return module.__dict__.get("_megacore_placements", {}).get(name, REPLICATED)


__all__ = ["REPLICATED", "Placement", "place", "placement_of"]
