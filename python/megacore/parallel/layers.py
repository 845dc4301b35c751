"""Megatron's tensor-parallel layers: GEMMs and the embedding partitioned across the tensor-parallel group.

=========================  ==========================  =========================================
layer                      ``weight`` (this rank)      sharded along
=========================  ==========================  =========================================
ColumnParallelLinear       ``[out / tp, in]``          dim 0 of the full ``[out, in]`` (bias too)
RowParallelLinear          ``[out, in / tp]``          dim 1 of the full ``[out, in]`` (bias full)
VocabParallelEmbedding     ``[padded_vocab / tp, h]``  dim 0 of the full ``[padded_vocab, h]``
=========================  ==========================  =========================================

Each layer declares its parameters' sharded dim (the dim above; ``megacore.parallel.placement.place``), which
the parallel plan (``megacore.parallel.sharding``) reads, so checkpoint code can rebuild the full tensor with
:func:`merge_weights` and reshard it with :func:`split_weight`. The embedding's vocab is padded up to a multiple of the tensor-parallel size;
the padded rows are zeros and no id ever selects them (``merge_weights(...)[:num_embeddings]`` is the
unpadded table).

Initialization (Megatron's ``init_method_normal(0.02)``): every rank draws the FULL master weight,
fp32 on CPU, ``normal(0, 0.02)`` from torch's default generator, then keeps its shard; biases are
zeros. So with the same seed on every rank, TP=N builds exactly the model TP=1 builds (and every rank
consumes the same random numbers, keeping later draws in step).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megacore import _C
from megacore.parallel import state
from megacore.parallel.placement import place
from megacore.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
)

INIT_STD = 0.02


def split_weight(full: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous shard of ``full`` along ``dim``: ``[.., n, ..] -> [.., n / world_size, ..]``
    (a contiguous copy). Raises ValueError when ``world_size`` does not divide ``full.size(dim)``."""
    start, end = _C.shard_range(full.size(dim), rank, world_size)
    return full.narrow(dim, start, end - start).contiguous().clone()


def merge_weights(shards: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """The full tensor from every rank's shard in rank order: concatenation along ``dim``
    (the inverse of :func:`split_weight`)."""
    return torch.cat(list(shards), dim)


def _tp(layer: str, **divisible: int):
    """(group, rank, world_size) of the tensor-parallel group for a layer; the errors of
    state.require_tensor_parallel, naming the layer."""
    s = state.require_tensor_parallel(f"megacore.parallel.{layer}", divisible)
    return s.tensor_parallel_group, s.tensor_parallel_rank, s.tensor_parallel_size


def _master_normal(*shape: int) -> torch.Tensor:
    """The full master weight: fp32 on CPU, normal(0, INIT_STD) from the default generator."""
    return torch.empty(*shape, dtype=torch.float32).normal_(0.0, INIT_STD)


def _param(module: nn.Module, name: str, shard: torch.Tensor, dtype, device, partition_dim: Optional[int]) -> None:
    """Registers ``shard`` as ``module.<name>`` and declares it sharded along ``partition_dim`` (None: replicated)."""
    setattr(module, name, nn.Parameter(shard.to(device=device, dtype=dtype)))
    place(module, name, partition_dim)


class ColumnParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W [out, in]`` split along its output dim (columns of ``W.T``).

    Forward: ``x [..., in]`` enters through ``copy_to_tensor_parallel_region`` (its gradient is
    all-reduced), each rank computes ``[..., out / tp]``; with ``gather_output`` the pieces are
    all-gathered into ``[..., out]``, otherwise the output stays parallel (feed it to a
    :class:`RowParallelLinear` with ``input_is_parallel=True``: Megatron's MLP).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.group, rank, world = _tp("ColumnParallelLinear", out_features=out_features)
        self.in_features, self.out_features, self.gather_output = in_features, out_features, gather_output
        self.out_features_per_partition = _C.divide(out_features, world)
        _param(self, "weight", split_weight(_master_normal(out_features, in_features), 0, rank, world), dtype, device, 0)
        if bias:
            _param(self, "bias", torch.zeros(self.out_features_per_partition), dtype, device, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)  # [..., out / tp]
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"per_partition={self.out_features_per_partition}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W [out, in]`` split along its input dim (rows of ``W.T``).

    Forward: ``x [..., in / tp]`` (or ``[..., in]`` scattered first when ``input_is_parallel`` is False),
    each rank computes a partial ``[..., out]``, summed with ``reduce_from_tensor_parallel_region``;
    the full, replicated bias is added after the all-reduce (so it is added once).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.group, rank, world = _tp("RowParallelLinear", in_features=in_features)
        self.in_features, self.out_features, self.input_is_parallel = in_features, out_features, input_is_parallel
        self.in_features_per_partition = _C.divide(in_features, world)
        _param(self, "weight", split_weight(_master_normal(out_features, in_features), 1, rank, world), dtype, device, 1)
        if bias:
            _param(self, "bias", torch.zeros(out_features), dtype, device, None)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)  # [..., in] -> [..., in / tp]
        y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.group)  # [..., out]
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"per_partition={self.in_features_per_partition}, input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """An embedding table ``[num_embeddings, embedding_dim]`` split along the vocab.

    The vocab is padded to ``padded_vocab = pad_to_multiple(num_embeddings, tp)``; this rank owns ids
    ``[vocab_start, vocab_end)``. Forward: ids outside that range look up row 0 and are zeroed, then the
    ``[..., embedding_dim]`` partial results are all-reduced (each id is owned by exactly one rank).
    Ids must be in ``[0, num_embeddings)`` (checked in eager mode; a host sync on CUDA).
    ``tensor_parallel=False`` builds the whole table (same draws) for a process without model parallelism.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32, device=None,
                 tensor_parallel: bool = True):
        super().__init__()
        # tensor_parallel=False: the whole table on this process, no group needed (models use one class for both).
        self.group, rank, world = _tp("VocabParallelEmbedding") if tensor_parallel else (None, 0, 1)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_vocab = _C.pad_to_multiple(num_embeddings, world)
        self.vocab_start, self.vocab_end = _C.vocab_range(self.padded_vocab, rank, world)
        full = torch.zeros(self.padded_vocab, embedding_dim)
        full[:num_embeddings] = _master_normal(num_embeddings, embedding_dim)  # same draws as TP=1
        _param(self, "weight", split_weight(full, 0, rank, world), dtype, device, 0 if self.group is not None else None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_embeddings:
                raise ValueError(f"megacore.parallel.VocabParallelEmbedding: ids hold {lo if lo < 0 else hi}, "
                                 f"outside [0, num_embeddings={self.num_embeddings})")
        if self.group is None:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)  # [..., h]
        return reduce_from_tensor_parallel_region(out, self.group)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"padded_vocab={self.padded_vocab}, vocab_range=[{self.vocab_start}, {self.vocab_end})")


__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "merge_weights",
    "split_weight",
    "INIT_STD",
]
