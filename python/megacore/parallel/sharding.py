"""How a model's parameters are laid out over the tensor-parallel group, and the one gather/scatter
between full tensors and this rank's shards, used by checkpoints and the Hugging Face interop alike.

A parameter is either replicated (every rank holds the whole tensor) or sharded along one dim, as its
layer tagged it (``partition_dim``: megacore.parallel's layers and the transformer layer). A *vocab
table* is one whose dim 0 is the vocabulary, padded with zero rows to a multiple of the tensor-parallel
size: every :class:`~megacore.parallel.layers.VocabParallelEmbedding`'s table, and the output bias of a
masked-LM head (``MaskedLMHead.bias``). Full tensors are always unpadded: padding rows are added on the
way in and cut on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.parallel.collectives import all_gather
from megacore.parallel.layers import VocabParallelEmbedding, merge_weights, split_weight


# The attributes a layer tags its parameters with (megacore.parallel.layers, the transformer layer).
LAYOUT_TAGS = ("tensor_parallel", "partition_dim", "sequence_parallel")


def copy_layout_tags(src: nn.Parameter, dst: nn.Parameter) -> nn.Parameter:
    """Gives ``dst`` (a new parameter standing for ``src``: a loaded shard, an fp32 master) ``src``'s
    layout tags; returns ``dst``."""
    for tag in LAYOUT_TAGS:
        if hasattr(src, tag):
            setattr(dst, tag, getattr(src, tag))
    return dst


@dataclass(frozen=True)
class ParamShard:
    """One parameter of a model and its layout over a tensor-parallel group of ``world`` ranks."""

    name: str  # the first name model.named_parameters() gives it (a tied parameter appears once)
    param: nn.Parameter
    dim: Optional[int]  # the dim it is sharded along; None: this rank holds the whole tensor
    vocab_size: Optional[int]  # the unpadded rows of a vocab table (dim 0); None: not a vocab table
    world: int

    def full_shape(self) -> list[int]:
        """The full, unpadded shape: shards merged, vocab padding cut."""
        shape = list(self.param.shape)
        if self.dim is not None:
            shape[self.dim] *= self.world
        if self.vocab_size is not None:
            shape[0] = self.vocab_size
        return shape


def _vocab_tables(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> unpadded vocab size, for the parameters whose dim 0 is the vocabulary."""
    from megacore.models.common import MaskedLMHead  # models import parallel; imported here, not at the top

    out = {}
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            out[id(module.weight)] = module.num_embeddings
        elif isinstance(module, MaskedLMHead):
            out[id(module.bias)] = module.config.vocab_size
    return out


def param_shards(model: nn.Module, world: int) -> list[ParamShard]:
    """Every parameter of ``model`` (tied ones once, under their first name) with its layout over a
    tensor-parallel group of ``world`` ranks (world 1: nothing is sharded)."""
    vocab = _vocab_tables(model)
    out = []
    for name, p in model.named_parameters():
        sharded = world > 1 and getattr(p, "tensor_parallel", False) and getattr(p, "partition_dim", None) is not None
        out.append(ParamShard(name, p, p.partition_dim if sharded else None, vocab.get(id(p)), world))
    return out


@torch.no_grad()
def gather_full(shard: ParamShard, t: torch.Tensor, group) -> torch.Tensor:
    """The full, unpadded tensor of ``t``, this rank's piece of ``shard``'s parameter (or a tensor of its
    shape, such as an optimizer moment), on ``t``'s device. A collective over the tensor-parallel
    ``group`` for a sharded parameter: every rank of the group must call it, in the same order."""
    t = t.detach()
    if shard.dim is not None:
        gathered = all_gather(t.unsqueeze(0).contiguous(), 0, group)  # [world, *piece]
        t = merge_weights(gathered.unbind(0), shard.dim)
    if shard.vocab_size is not None:
        t = t[: shard.vocab_size]
    return t


def shard_of(shard: ParamShard, full: torch.Tensor, rank: int) -> Optional[torch.Tensor]:
    """This rank's piece of ``full`` (a full, unpadded tensor of ``shard``'s parameter): padded with zero
    rows to the padded vocab for a vocab table, then split along the sharded dim. None when ``full`` does
    not have the parameter's full shape (the caller raises, naming what it read)."""
    if list(full.shape) != shard.full_shape():
        return None
    t = full
    if shard.vocab_size is not None:
        padded = shard.param.shape[0] * (shard.world if shard.dim == 0 else 1)
        t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, padded - t.shape[0]))
    if shard.dim is not None:
        t = split_weight(t, shard.dim, rank, shard.world)
    return t


__all__ = ["LAYOUT_TAGS", "ParamShard", "copy_layout_tags", "gather_full", "param_shards", "shard_of"]
