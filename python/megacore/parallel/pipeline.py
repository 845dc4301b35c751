"""Pipeline parallelism: a model cut into stages by layer ranges, and the 1F1B schedules that run
micro-batches through them (Narayanan et al., 2021; Megatron-LM's ``forward_backward_pipelining_*``).

    stage 0                      stage 1                     ...  stage P-1
    input part + layers [0, n)   layers [n, 2n)                   layers [(P-1)n, L) + output part + loss
          --- activations (point-to-point, shapes known in advance) --->
          <--- gradients of those activations ---------------------------

A model that can be cut is a :class:`megacore.models.common.StagedModel` (GPT, BERT/RoBERTa, ELECTRA, T5):
an input part, the pipeline layers (one TransformerStack's, or several stacks' one after the other: T5's
encoder then decoder), an output part. :func:`cut_stage` keeps this rank's part of it; parameter names stay
the full model's, so checkpoints and optimizers see the same names at any layout. A module several stages
need (the tied word embedding, T5's bias tables) is held by each, and its gradients are summed over them
(:func:`sync_tied_gradients`). With ``virtual_size`` V > 1 (the interleaved schedule) a rank holds V chunks
of layers: rank r's chunk c is virtual stage ``c * P + r`` of ``P * V``.

The schedule (:func:`schedule`) is a list of ("forward" | "backward", micro-batch, chunk) for one rank;
:func:`forward_backward` runs it. Sends are asynchronous and receives are posted one operation ahead,
so the next micro-batch's transfer overlaps this one's compute; every rank computes the shapes it will
receive from the micro-batch and the boundary (``StagedModel.boundary_spec``), so nothing but the tensors
travels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from megacore._profiling import phase
from megacore.parallel import state as parallel_state
from megacore.parallel.collectives import all_reduce

_NAME = "megacore.parallel.pipeline"
FORWARD, BACKWARD = "forward", "backward"
_ACTIVATION_TAG, _GRADIENT_TAG = 11, 12  # gloo matches by tag; NCCL by group (see ParallelState)


# ---- the stage layout ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageLayout:
    """Where this rank sits in the pipeline and what it holds (``model.pipeline`` after :func:`cut_stage`).

    chunks: per virtual chunk ``c`` (0 .. V-1), the indices of its pipeline layers (virtual stage ``c*P + rank``).
    shared: ``(name, ranks)`` for each parameter this rank holds that other ranks hold too (the tied word embedding,
        T5's position-bias tables), ``ranks`` ascending: the first owns it, the others hold copies (``tied_copies``)
        whose gradients are summed with the owner's (:func:`sync_tied_gradients`); gradient norms count it once and
        checkpoints save the owner's.
    tie_groups: every set of ranks some parameter is shared over, on any rank (the same tuple on every rank, so
        that all ranks create their process groups alike).
    """

    rank: int
    size: int
    virtual_size: int
    chunks: tuple[tuple[int, ...], ...]
    shared: tuple[tuple[str, tuple[int, ...]], ...] = ()
    tie_groups: tuple[tuple[int, ...], ...] = ()

    @property
    def tied_copies(self) -> frozenset:
        """The names of parameters this rank holds as a copy of another rank's (their owner's)."""
        return frozenset(name for name, ranks in self.shared if ranks[0] != self.rank)

    def owner(self, name: str) -> int:
        """The rank that owns parameter ``name`` (this rank unless it holds a copy)."""
        return next((ranks[0] for n, ranks in self.shared if n == name), self.rank)

    def is_first(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is the model's first virtual stage (it runs the input part)."""
        return self.rank == 0 and chunk == 0

    def is_last(self, chunk: int) -> bool:
        """Whether chunk ``chunk`` is the model's last virtual stage (it runs the output part and the loss)."""
        return self.rank == self.size - 1 and chunk == self.virtual_size - 1

    @property
    def holds_first(self) -> bool:
        return self.rank == 0

    @property
    def holds_last(self) -> bool:
        return self.rank == self.size - 1


def stage_layers(num_layers: int, pipeline_size: int, virtual_size: int = 1) -> list[list[range]]:
    """The layers of each rank's chunks: ``[rank][chunk] -> range`` of global layer indices, virtual stage
    ``chunk * pipeline_size + rank`` holding ``num_layers / (pipeline_size * virtual_size)`` consecutive
    layers. Raises ValueError when that does not divide."""
    stages = pipeline_size * virtual_size
    if num_layers % stages:
        what = (f"pipeline_parallel_size {pipeline_size} x virtual_pipeline_parallel_size {virtual_size} = {stages}"
                if virtual_size > 1 else f"pipeline_parallel_size {pipeline_size}")
        raise ValueError(f"{_NAME}: the model's {num_layers} layers do not divide into {what} stages of equal size")
    n = num_layers // stages
    return [[range((c * pipeline_size + r) * n, (c * pipeline_size + r + 1) * n) for c in range(virtual_size)]
            for r in range(pipeline_size)]


def _check_size(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{_NAME}: {name}={value!r} must be an int >= 1")


def _module_or_none(model: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at ``path``, or None where it (or a module above it) is None or absent."""
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if not isinstance(module, nn.Module):
            return None
    return module


def _set(model: nn.Module, path: str, value: Optional[nn.Module]) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, value)


def _stage_needs(model: nn.Module, layers: list[int], first: bool, last: bool) -> set[str]:
    """The module paths a rank holding pipeline layers ``layers`` needs besides them."""
    needs = set(model.layer_modules(layers))
    if first:
        needs |= set(model.first_stage_modules)
    if last:
        needs |= set(model.last_stage_modules) | set(model.tied_modules)
    return needs


def _holds(needs: set[str], path: str) -> bool:
    """Whether a rank needing ``needs`` holds the module or parameter at ``path`` (it or a module above it)."""
    return any(path == n or path.startswith(n + ".") for n in needs)


def cut_stage(model: nn.Module, rank: Optional[int] = None, size: Optional[int] = None,
              virtual_size: int = 1) -> nn.Module:
    """Keeps, in place, the part of ``model`` (a StagedModel, built whole) that pipeline rank ``rank`` of
    ``size`` runs, and returns it with ``model.pipeline`` (a :class:`StageLayout`) set.

    Each rank keeps the pipeline layers of its ``virtual_size`` chunks (each stack's layer list becoming an
    ``nn.ModuleDict`` keyed by the layer's index in its stack, so every kept parameter keeps its name), and the
    modules it needs besides them: the input part's on the first rank, the output part's (and the tied modules)
    on the last, and those its layers need (``StagedModel.layer_modules``). A module several ranks need is held by
    each (when only a module inside a declared one is needed, only it: GPT's last stage keeps ``embedding.word``
    of ``embedding``); its parameters are shared (``StageLayout.shared``), the lowest rank owning them. Declared
    modules a rank does not need are dropped (set to None); the memory of what was dropped is freed once nothing
    else refers to it. ``rank``/``size`` default to this process's pipeline rank and size
    (``initialize_model_parallel``).

    Build the whole model on every rank with the same seed first (as ``megacore train`` does), so each stage
    starts from the weights one process would have.

    Raises ValueError when the layers do not divide into ``size * virtual_size`` equal stages, a size is not
    an int >= 1, the rank is out of range, or the model has parameters outside its stacks and declared modules
    (no stage would know it holds them); TypeError when ``model`` is not a StagedModel.
    """
    from megacore.models.common import StagedModel, TransformerStack

    if not isinstance(model, StagedModel):
        raise TypeError(f"{_NAME}.cut_stage: model must be a megacore StagedModel (GPT, BERT, ELECTRA, T5), got "
                        f"{type(model).__name__}")
    if getattr(model, "pipeline", None) is not None:
        raise ValueError(f"{_NAME}.cut_stage: the model is already cut (pipeline rank {model.pipeline.rank} of "
                         f"{model.pipeline.size})")
    if rank is None or size is None:
        s = parallel_state.get_parallel_state()
        rank, size = s.pipeline_parallel_rank, s.pipeline_parallel_size
    _check_size("size", size)
    _check_size("virtual_size", virtual_size)
    if not (isinstance(rank, int) and 0 <= rank < size):
        raise ValueError(f"{_NAME}.cut_stage: rank={rank!r} is not in [0, {size})")
    pipeline_layers = model.pipeline_layers()
    per_rank = stage_layers(len(pipeline_layers), size, virtual_size)
    needs = [_stage_needs(model, [i for chunk in per_rank[r] for i in chunk], r == 0, r == size - 1)
             for r in range(size)]
    declared = sorted(set().union(*needs), key=lambda p: (p.count("."), p))  # modules above the ones inside them

    # Who holds each parameter outside the stacks: the ranks needing its module or one above it.
    stacks = tuple(model.pipeline_stacks)
    shared, tie_groups, stray = [], set(), []
    for name, _ in model.named_parameters():
        if name.startswith(tuple(path + "." for path in stacks)):
            continue
        if not _holds(set(declared), name):
            stray.append(name)
        holders = tuple(r for r in range(size) if _holds(needs[r], name))
        if len(holders) > 1:
            tie_groups.add(holders)
            if rank in holders:
                shared.append((name, holders))
    if stray:
        raise ValueError(f"{_NAME}.cut_stage: {type(model).__name__}'s parameters {stray} are in none of its "
                         "pipeline stacks and no stage declares their module (first_stage_modules, "
                         "last_stage_modules, tied_modules, layer_modules)")

    chunks = tuple(tuple(r) for r in per_rank[rank])
    keep = {i for chunk in chunks for i in chunk}
    for path in stacks:
        stack = model.get_submodule(path)
        assert isinstance(stack, TransformerStack), path
        stack.layers = nn.ModuleDict({str(i): stack.layer(i) for g, (p, i) in enumerate(pipeline_layers)
                                      if p == path and g in keep})
    mine = needs[rank]
    for path in declared:
        module = _module_or_none(model, path)
        if module is None or _holds(mine, path):
            continue
        inner = sorted(n for n in mine if n.startswith(path + "."))
        if inner:  # keep only the modules inside it that this rank needs
            bare = nn.Module()
            for full in inner:
                name = full[len(path) + 1:]
                assert "." not in name, full
                setattr(bare, name, module.get_submodule(name))
            _set(model, path, bare)
        else:
            _set(model, path, None)
    model.pipeline = StageLayout(rank, size, virtual_size, chunks, tuple(shared), tuple(sorted(tie_groups)))
    return model


def layout_of(model: nn.Module) -> Optional[StageLayout]:
    """The StageLayout of a cut model (through a DistributedDataParallel wrapper too), or None."""
    return getattr(getattr(model, "module", model), "pipeline", None)


def tied_copy_names(model: nn.Module) -> frozenset:
    """Names of parameters this rank holds as copies of another rank's (empty when not cut)."""
    layout = layout_of(model)
    return layout.tied_copies if layout is not None else frozenset()


def tied_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters this rank shares with other stages (``StageLayout.shared``: the tied word embedding on the
    first and last stage, T5's position-bias tables and word embedding; empty without pipeline parallelism).
    DistributedDataParallel gives each its own bucket, so every stage holding it slices its gradient alike."""
    layout = layout_of(model)
    if layout is None or not layout.shared:
        return []
    params = dict(getattr(model, "module", model).named_parameters())
    return [params[name] for name, _ in layout.shared]


@torch.no_grad()
def sync_tied_gradients(model: nn.Module) -> None:
    """Sums the gradients of each shared parameter (``StageLayout.shared``) over the stages holding it (for GPT
    and BERT, the word embedding over the first and last stage: Megatron's embedding group), so every copy takes
    the same step. Reads ``main_grad`` when DistributedDataParallel made one; after a reduce-scatter (the
    distributed optimizer) only this rank's slice of it is meaningful, and it is the same slice on every stage
    because the parameter has a bucket of its own there (:func:`tied_parameters`). Every rank must call it: the
    first call creates the groups of stages (``get_pipeline_stages_group``). A no-op without shared parameters."""
    from megacore.parallel.distributed import grad_of

    inner = getattr(model, "module", model)
    layout = getattr(inner, "pipeline", None)
    if layout is None or not layout.tie_groups:
        return
    params = dict(inner.named_parameters())
    for stages in layout.tie_groups:
        group = parallel_state.get_pipeline_stages_group(stages)
        if group is None:
            continue
        for name, ranks in layout.shared:  # in the model's order, the same on every rank of the group
            if ranks != stages:
                continue
            p = params[name]
            g = grad_of(p)
            if g is None:  # this stage did not use it: it contributes zero
                g = p.grad = torch.zeros_like(p)
            g.copy_(all_reduce(g, group))


# ---- the schedules -----------------------------------------------------------------------------------------------


class Op(NamedTuple):
    """One step of a rank's schedule."""

    kind: str  # FORWARD or BACKWARD
    microbatch: int
    chunk: int


def check_schedule(num_microbatches: int, pipeline_size: int, virtual_size: int = 1) -> None:
    """ValueError for a layout the schedule cannot run: the interleaved schedule needs the micro-batches to
    come in whole rounds of ``pipeline_size`` (Megatron's rule)."""
    _check_size("num_microbatches", num_microbatches)
    _check_size("pipeline_size", pipeline_size)
    _check_size("virtual_size", virtual_size)
    if virtual_size > 1 and num_microbatches % pipeline_size:
        raise ValueError(f"{_NAME}: the interleaved schedule (virtual_pipeline_parallel_size {virtual_size}) needs "
                         f"the micro-batches per step ({num_microbatches}) to be a multiple of the pipeline-parallel "
                         f"size {pipeline_size}")


def warmup_forwards(num_microbatches: int, pipeline_size: int, rank: int, virtual_size: int = 1) -> int:
    """How many forwards rank ``rank`` runs before its first backward. 1F1B: ``P - rank - 1`` (the
    forwards in flight when the last stage starts backward). Interleaved: ``2 (P - rank - 1) + (V - 1) P``,
    every forward when there are only ``P`` micro-batches (Megatron's numbers)."""
    total = num_microbatches * virtual_size
    if virtual_size == 1:
        return min(pipeline_size - rank - 1, total)
    if num_microbatches == pipeline_size:
        return total
    return min(2 * (pipeline_size - rank - 1) + (virtual_size - 1) * pipeline_size, total)


def schedule(num_microbatches: int, pipeline_size: int, rank: int, virtual_size: int = 1) -> list[Op]:
    """Rank ``rank``'s operations, in order, for one step of ``num_microbatches`` micro-batches: warm-up
    forwards, then one forward and one backward alternately (steady 1F1B), then the cool-down backwards.

    With ``virtual_size`` V > 1 (interleaved 1F1B) the k-th forward runs chunk ``(k mod PV) // P`` on
    micro-batch ``(k // PV) P + k mod P`` (groups of P micro-batches go through one chunk, then the next),
    and the k-th backward runs the chunks in reverse order on the same micro-batches. Raises ValueError
    (``check_schedule``) for a layout the schedule cannot run.
    """
    check_schedule(num_microbatches, pipeline_size, virtual_size)
    if not (isinstance(rank, int) and 0 <= rank < pipeline_size):
        raise ValueError(f"{_NAME}.schedule: rank={rank!r} is not in [0, {pipeline_size})")
    P, V = pipeline_size, virtual_size
    total = num_microbatches * V

    def microbatch(k: int) -> int:
        return (k // (P * V)) * P + k % P if V > 1 else k

    def chunk(k: int, forward: bool) -> int:
        c = (k % (P * V)) // P
        return c if forward else V - 1 - c

    warmup = warmup_forwards(num_microbatches, P, rank, V)
    ops = [Op(FORWARD, microbatch(k), chunk(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        ops.append(Op(FORWARD, microbatch(warmup + k), chunk(warmup + k, True)))
        ops.append(Op(BACKWARD, microbatch(k), chunk(k, False)))
    ops += [Op(BACKWARD, microbatch(k), chunk(k, False)) for k in range(total - warmup, total)]
    return ops


def forward_schedule(num_microbatches: int, virtual_size: int = 1) -> list[Op]:
    """Forward only (evaluation): each micro-batch through each chunk, in order."""
    return [Op(FORWARD, m, c) for m in range(num_microbatches) for c in range(virtual_size)]


def bubble_fraction(num_microbatches: int, pipeline_size: int, virtual_size: int = 1) -> float:
    """The schedule's idle fraction with equal stages: ``(P - 1) / (V m + P - 1)`` (Narayanan et al.)."""
    return (pipeline_size - 1) / (virtual_size * num_microbatches + pipeline_size - 1)


# ---- running a schedule ------------------------------------------------------------------------------------------


def default_output_loss(output, batch: dict) -> torch.Tensor:
    """A stage output's loss: ``output.loss`` when it has one (BERT, ELECTRA), else the mean of a per-token
    loss ``[b, s]`` over the tokens whose label is not -100 (GPT)."""
    if hasattr(output, "loss"):
        return output.loss
    mask = (batch["labels"] != -100).to(output.dtype)
    return (output * mask).sum() / mask.sum().clamp(min=1)


class _Channel:
    """Point-to-point transfers with the neighbouring stages of this rank's pipeline group."""

    def __init__(self, layout: StageLayout):
        s = parallel_state.get_parallel_state()
        ranks = s.pipeline_parallel_ranks
        self.next_rank = ranks[(layout.rank + 1) % layout.size]
        self.prev_rank = ranks[(layout.rank - 1) % layout.size]
        self.activation_group, self.gradient_group = s.pipeline_activation_group, s.pipeline_gradient_group
        self.pending_sends: list = []

    def send(self, tensors: list[torch.Tensor], to_next: bool) -> None:
        peer, group, tag = ((self.next_rank, self.activation_group, _ACTIVATION_TAG) if to_next
                            else (self.prev_rank, self.gradient_group, _GRADIENT_TAG))
        for t in tensors:
            t = t.detach().contiguous()
            self.pending_sends.append((dist.isend(t, peer, group=group, tag=tag), t))

    def recv(self, spec: list, from_prev: bool, device) -> tuple[list[torch.Tensor], list]:
        peer, group, tag = ((self.prev_rank, self.activation_group, _ACTIVATION_TAG) if from_prev
                            else (self.next_rank, self.gradient_group, _GRADIENT_TAG))
        buffers = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in spec]
        works = [dist.irecv(b, peer, group=group, tag=tag) for b in buffers]
        return buffers, works

    def wait_sends(self) -> None:
        for work, _ in self.pending_sends:
            work.wait()
        self.pending_sends.clear()


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def forward_backward(model: nn.Module, micro_batches: list[dict], scale_loss: Callable[[torch.Tensor], torch.Tensor],
                     output_loss: Callable = default_output_loss, no_sync: Optional[Callable] = None,
                     forward_only: bool = False, record: Optional[list] = None,
                     on_output: Optional[Callable] = None, timings: Optional[dict] = None) -> list[torch.Tensor]:
    """Runs one step's micro-batches through this rank's stage of ``model`` (cut with :func:`cut_stage`,
    possibly wrapped in DistributedDataParallel) with the 1F1B schedule (interleaved when the model has
    virtual chunks), or forwards only.

    Args:
        micro_batches: this data-parallel rank's micro-batches (every pipeline rank gets the same ones: each
            stage reads what it needs, the first the ids, the last the labels, every one the mask).
        scale_loss: maps a micro-batch's loss to what backward starts from (``loss / m``, times the loss
            scale under fp16).
        output_loss: ``output_loss(stage_output, batch) -> 0-dim loss`` on the last stage (the task's).
        no_sync: a context manager factory (DistributedDataParallel.no_sync) entered for every backward but
            this rank's last, so that data-parallel reduction happens once per step.
        forward_only: evaluation: forwards in micro-batch order, no backward, nothing kept for it.
        record: when a list, each operation run is appended to it (kind, micro-batch, chunk).
        on_output: ``on_output(microbatch, stage_output, acts)`` on the last stage (evaluation's metrics; ``acts``
            what the last layer gave).
        timings: when a dict, ``"wait_s"`` (seconds spent waiting for a neighbour's activations or gradients:
            the pipeline bubble as this rank sees it) and ``"total_s"`` are added to it (benchmarks/pipeline.py).

    Returns this rank's losses, one 0-dim fp32 tensor per micro-batch it computed a loss for (the last
    stage's output loss plus the first stage's input-part loss, when it has one: ELECTRA's generator), detached;
    the step's loss is their sum over the pipeline group divided by the number of micro-batches.
    Raises ValueError for a model that is not cut or a layout the schedule cannot run.
    """
    inner = getattr(model, "module", model)
    layout = getattr(inner, "pipeline", None)
    if layout is None:
        raise ValueError(f"{_NAME}.forward_backward: the model is not cut into pipeline stages (cut_stage)")
    m = len(micro_batches)
    ops = (forward_schedule(m, layout.virtual_size) if forward_only
           else schedule(m, layout.size, layout.rank, layout.virtual_size))
    channel = _Channel(layout) if layout.size > 1 else None
    device = next(inner.parameters()).device
    spec_cache: dict[tuple[int, int], list] = {}

    def spec(mb: int, layer: int) -> list:
        """What crosses the boundary before pipeline layer ``layer`` for micro-batch ``mb``."""
        if (mb, layer) not in spec_cache:
            spec_cache[(mb, layer)] = inner.boundary_spec(micro_batches[mb], layer)
        return spec_cache[(mb, layer)]

    # What a forward receives: posted one operation ahead, so the transfer overlaps the compute before it.
    posted: dict[tuple[str, int, int], tuple] = {}

    def needs_recv(op: Op) -> bool:
        if op.kind == FORWARD:
            return not layout.is_first(op.chunk)
        return not layout.is_last(op.chunk)

    def post(op: Op) -> None:
        key = (op.kind, op.microbatch, op.chunk)
        if channel is None or key in posted or not needs_recv(op):
            return
        layers = layout.chunks[op.chunk]
        if op.kind == FORWARD:
            posted[key] = channel.recv(spec(op.microbatch, layers[0]), True, device)
        else:  # the gradients of what this chunk sent on
            float_spec = [s for s in spec(op.microbatch, layers[-1] + 1) if s[1].is_floating_point]
            posted[key] = channel.recv(float_spec, False, device)

    def take(op: Op) -> list[torch.Tensor]:
        post(op)
        buffers, works = posted.pop((op.kind, op.microbatch, op.chunk))
        start = time.perf_counter()
        for w in works:
            w.wait()
        if timings is not None:
            timings["wait_s"] = timings.get("wait_s", 0.0) + time.perf_counter() - start
        return buffers

    saved: dict[tuple[int, int], tuple] = {}  # (microbatch, chunk) -> (inputs, outputs, loss to backward)
    losses: list[torch.Tensor] = []
    backwards = sum(1 for op in ops if op.kind == BACKWARD)
    done_backwards = 0
    step_start = time.perf_counter()
    try:
        for i, op in enumerate(ops):
            if record is not None:
                record.append(op)
            post(op)  # receives are matched in the order they are posted: this op's before the next one's
            if i + 1 < len(ops):
                post(ops[i + 1])
            batch = micro_batches[op.microbatch]
            if op.kind == FORWARD:
                with phase("megacore.forward"), torch.set_grad_enabled(not forward_only):
                    stage_loss = None
                    if layout.is_first(op.chunk):
                        inputs, stage_loss = inner.stage_input(batch)
                        received = []
                    else:
                        received = take(op)
                        if not forward_only:
                            for t in received:
                                if _differentiable(t):
                                    t.requires_grad_(True)
                        inputs = tuple(received)
                    outputs = tuple(inner.run_layers(inputs, batch, list(layout.chunks[op.chunk])))
                    if layout.is_last(op.chunk):
                        output = inner.stage_output(outputs, batch)
                        if on_output is not None:
                            on_output(op.microbatch, output, outputs)
                        loss = output_loss(output, batch)
                        stage_loss = loss if stage_loss is None else stage_loss + loss
                        outputs = ()
                    else:
                        channel.send(list(outputs), True)
                    if stage_loss is not None:
                        losses.append(stage_loss.detach().float())
                    if not forward_only:
                        saved[(op.microbatch, op.chunk)] = (received, outputs, stage_loss)
            else:
                received, outputs, stage_loss = saved.pop((op.microbatch, op.chunk))
                tensors, grads = [], []
                if not layout.is_last(op.chunk):
                    grad_buffers = take(op)
                    differentiable = [t for t in outputs if _differentiable(t)]
                    tensors += differentiable
                    grads += grad_buffers
                if stage_loss is not None:
                    tensors.append(scale_loss(stage_loss))
                    grads.append(None)
                done_backwards += 1
                last = done_backwards == backwards
                with phase("megacore.backward"):
                    if no_sync is not None and not last:
                        with no_sync():
                            torch.autograd.backward(tensors, grads)
                    else:
                        torch.autograd.backward(tensors, grads)
                if not layout.is_first(op.chunk):
                    channel.send([t.grad if t.grad is not None else torch.zeros_like(t)
                                  for t in received if _differentiable(t)], False)
        if channel is not None:
            channel.wait_sends()
        if timings is not None:
            timings["total_s"] = timings.get("total_s", 0.0) + time.perf_counter() - step_start
            timings.setdefault("wait_s", 0.0)
    finally:
        posted.clear()
        saved.clear()
    return losses


def pipeline_loss(losses: list[torch.Tensor], num_microbatches: int, device) -> torch.Tensor:
    """The step's loss, the same on every pipeline rank: the sum of every rank's micro-batch losses (the last
    stage's, and a first stage's input-part losses) over the pipeline group, divided by ``num_microbatches``."""
    total = torch.stack(losses).sum() if losses else torch.zeros((), dtype=torch.float32, device=device)
    total = total.reshape(1).to(torch.float32)
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_pipeline_parallel_world_size() > 1:
        total = all_reduce(total, parallel_state.get_pipeline_parallel_group())
    return total.reshape(()) / num_microbatches


__all__ = ["BACKWARD", "FORWARD", "Op", "StageLayout", "bubble_fraction", "check_schedule", "cut_stage",
           "default_output_loss", "forward_backward", "forward_schedule", "layout_of", "pipeline_loss", "schedule",
           "stage_layers", "sync_tied_gradients", "tied_copy_names", "tied_parameters", "warmup_forwards"]
