"""The parallel plan: how a model's parameters lie over the tensor- and pipeline-parallel grid, declared once
by the modules that create them, and the one gather/scatter between full tensors and this rank's shards,
used by checkpoints and the Hugging Face interop alike.

A module that creates a parameter declares its placement with :func:`place`: sharded along one dim over the
tensor-parallel group (megacore.parallel's layers, the transformer layer, a masked-LM head's output bias), or
replicated, possibly used on a sequence shard under sequence parallelism (its gradient is then summed over
the group by its user). The declaration is an attribute of the *module*, so it survives what replaces a
module's Parameter objects (``Module.to_empty``, loading shards) and needs no copying onto fp32 masters or
optimizer pieces: those name their model parameter (``model_param``) and :class:`ParallelPlan` follows it.

A *vocab table* is one whose dim 0 is the vocabulary, padded with zero rows to a multiple of the
tensor-parallel size: every :class:`~megacore.parallel.layers.VocabParallelEmbedding`'s table, and the output
bias of a masked-LM head (``MaskedLMHead.bias``). Full tensors are always unpadded: padding rows are added on
the way in and cut on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.parallel import state as parallel_state
from megacore.parallel.collectives import all_gather, all_reduce
from megacore.parallel.layers import VocabParallelEmbedding, merge_weights, split_weight
from megacore.parallel.placement import Placement, place, placement_of


@dataclass(frozen=True)
class ParamShard:
    """One parameter of a model and its place in the grid (tensor-parallel group of ``world`` ranks)."""

    name: str  # the first name model.named_parameters() gives it (a tied parameter appears once)
    param: nn.Parameter
    dim: Optional[int]  # the dim it is sharded along; None: this rank holds the whole tensor
    vocab_size: Optional[int]  # the unpadded rows of a vocab table (dim 0); None: not a vocab table
    world: int
    sequence_parallel: bool = False  # replicated, used on sequence shards (its user sums its gradient)
    tied_copy: bool = False  # a pipeline stage's copy of a parameter another stage owns (the tied embedding)
    stage: int = 0  # the pipeline stage that owns it (a tied copy: its owner's); 0 without pipeline parallelism
    chunks: int = 1  # the sharded dim stacks this many pieces, each split over the ranks (see placement.place)

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
    """Every parameter of ``model`` (tied ones once, under their first name) with its placement over a
    tensor-parallel group of ``world`` ranks (world 1: nothing is sharded), as its module declared it
    (:func:`place`), whether it is a pipeline stage's tied copy, and the pipeline stage that owns it."""
    from megacore.parallel.pipeline import layout_of, tied_copy_names  # pipeline imports the models' layers

    vocab = _vocab_tables(model)
    copies = tied_copy_names(model)
    layout = layout_of(model)
    owner = {}  # id(parameter) -> (the module holding it, its name there)
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module, local))
    out = []
    for name, p in model.named_parameters():  # names as the model gives them (a DDP wrapper strips its prefix)
        placement = placement_of(*owner[id(p)])
        dim = placement.dim if world > 1 else None
        tied = name in copies
        out.append(ParamShard(name, p, dim, vocab.get(id(p)), world, placement.sequence_parallel, tied,
                              layout.owner(name) if layout is not None else 0, placement.chunks))
    return out


class ParallelPlan:
    """The parallel layout of one model on this process: the grid (``state``: the ParallelState, None
    without model parallelism) and every parameter's :class:`ParamShard`. The one place the optimizer's
    gradient norm, checkpoints and the interop read a parameter's layout from.

    ``layout(p)`` finds a parameter's entry from the parameter itself or from a stand-in that names it in
    ``model_param`` (MixedPrecision's fp32 masters, DistributedOptimizer's pieces)."""

    def __init__(self, model: nn.Module):
        inner = getattr(model, "module", model)  # through a DistributedDataParallel wrapper
        self.state = parallel_state.get_parallel_state() if parallel_state.model_parallel_is_initialized() else None
        self.tensor_parallel_size = self.state.tensor_parallel_size if self.state is not None else 1
        self.params = param_shards(inner, self.tensor_parallel_size)
        self._by_id = {id(shard.param): shard for shard in self.params}

    def layout(self, p: torch.Tensor) -> Optional[ParamShard]:
        """``p``'s entry (following ``p.model_param``), None for a tensor that is no parameter of the model."""
        shard = self._by_id.get(id(p))
        if shard is None and getattr(p, "model_param", None) is not None:
            shard = self._by_id.get(id(p.model_param))
        return shard

    def is_sharded(self, p: torch.Tensor) -> bool:
        """Whether ``p`` (or the parameter it stands for) is split over the tensor-parallel group."""
        shard = self.layout(p)
        return shard is not None and shard.dim is not None

    @property
    def has_sequence_parallel(self) -> bool:
        """Whether some parameter's gradient must be summed over the tensor-parallel group after backward
        (:func:`sum_sequence_parallel_gradients`)."""
        return self.tensor_parallel_size > 1 and any(shard.sequence_parallel for shard in self.params)

    def is_tied_copy(self, p: torch.Tensor) -> bool:
        """Whether ``p`` (or the parameter it stands for) is a stage's copy of a parameter another stage owns."""
        shard = self.layout(p)
        return shard is not None and shard.tied_copy


@torch.no_grad()
def sum_sequence_parallel_gradients(model_or_plan) -> None:
    """Sums over the tensor-parallel group the gradients of every parameter declared ``sequence_parallel``
    (replicated, used on this rank's sequence shard: the transformer layers' norms and row-parallel biases,
    the models' final norm and head layers), one all-reduce per gradient dtype, in place: what Megatron's
    ``finalize_model_grads`` does once per step, after the last backward (and after data-parallel reduction:
    the two sums commute). ``model_or_plan``: the model (a DistributedDataParallel wrapper is fine) or its
    :class:`ParallelPlan`. Reads ``main_grad`` when DistributedDataParallel made one. A collective over the
    tensor-parallel group: every rank of it must call it; a no-op without tensor parallelism."""
    from megacore.parallel.distributed import grad_of

    plan = model_or_plan if isinstance(model_or_plan, ParallelPlan) else ParallelPlan(model_or_plan)
    if plan.tensor_parallel_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for shard in plan.params:
        g = grad_of(shard.param) if shard.sequence_parallel else None
        if g is not None:
            by_dtype.setdefault(g.dtype, []).append(g)
    for grads in by_dtype.values():
        summed = all_reduce(torch.cat([g.reshape(-1) for g in grads]), plan.state.tensor_parallel_group)
        torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(summed.split([g.numel() for g in grads]), grads)])


@torch.no_grad()
def gather_full(shard: ParamShard, t: torch.Tensor, group) -> torch.Tensor:
    """The full, unpadded tensor of ``t``, this rank's piece of ``shard``'s parameter (or a tensor of its
    shape, such as an optimizer moment), on ``t``'s device. A collective over the tensor-parallel
    ``group`` for a sharded parameter: every rank of the group must call it, in the same order."""
    t = t.detach()
    if shard.dim is not None:
        gathered = all_gather(t.unsqueeze(0).contiguous(), 0, group)  # [world, *piece]
        pieces = [p.chunk(shard.chunks, shard.dim) for p in gathered.unbind(0)]  # [rank][chunk]
        t = torch.cat([merge_weights([p[c] for p in pieces], shard.dim) for c in range(shard.chunks)], shard.dim)
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
        t = torch.cat([split_weight(c, shard.dim, rank, shard.world) for c in t.chunk(shard.chunks, shard.dim)],
                      shard.dim)
    return t


__all__ = ["ParallelPlan", "ParamShard", "Placement", "gather_full", "param_shards", "place", "placement_of",
           "shard_of", "sum_sequence_parallel_gradients"]
