"""Tensor-, data- and pipeline-parallel process groups with Megatron-LM's rank layout.

Ranks are laid out with tensor-parallel ranks adjacent (they exchange the most data, so they should
share a node), then data-parallel, then pipeline-parallel:

    rank = tp_rank + tp * dp_rank + tp * dp * pp_rank

so tensor-parallel groups are consecutive blocks of ``tp`` ranks, data-parallel groups stride ``tp``
within one pipeline stage, and pipeline-parallel groups stride ``tp * dp``. Everything lives in one
frozen ``ParallelState``; the module-level accessors read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

_PREFIX = "megacore.parallel"


@dataclass(frozen=True, eq=False)
class ParallelState:
    """This rank's place in the (pipeline, data, tensor) grid and the three groups it belongs to.

    ``*_ranks`` are the global ranks of this rank's group in group-rank order; ``*_group_name`` is
    ``group.group_name``, the name C++ collectives resolve a group by.
    """

    tensor_parallel_size: int
    data_parallel_size: int
    pipeline_parallel_size: int
    tensor_parallel_rank: int
    data_parallel_rank: int
    pipeline_parallel_rank: int
    tensor_parallel_ranks: tuple[int, ...]
    data_parallel_ranks: tuple[int, ...]
    pipeline_parallel_ranks: tuple[int, ...]
    tensor_parallel_group: dist.ProcessGroup
    data_parallel_group: dist.ProcessGroup
    pipeline_parallel_group: dist.ProcessGroup
    tensor_parallel_group_name: str
    data_parallel_group_name: str
    pipeline_parallel_group_name: str
    # Pipeline parallelism only (None when pipeline_parallel_size is 1): point-to-point traffic between
    # neighbouring stages goes over two groups of the pipeline ranks, activations over one and gradients over
    # the other, so the two directions never queue behind each other (NCCL orders a communicator's p2p
    # operations per peer, whatever their tag); and the embedding group, the first and last stage (their
    # tied word embedding's gradients are summed over it), None on the stages in between.
    pipeline_activation_group: Optional[dist.ProcessGroup] = None
    pipeline_gradient_group: Optional[dist.ProcessGroup] = None
    embedding_group: Optional[dist.ProcessGroup] = None
    # Groups of some stages of each pipeline, made on first use (get_pipeline_stages_group): stage indices ->
    # this rank's group, None when its stage is not among them. The embedding group is (0, P - 1)'s.
    stage_groups: dict = dataclasses.field(default_factory=dict)


_STATE: Optional[ParallelState] = None


def _check_size(fn: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{_PREFIX}.{fn}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{_PREFIX}.{fn}: {name}={value} must be >= 1")


def rank_layout(world_size: int, tensor_parallel_size: int, pipeline_parallel_size: int):
    """Megatron's group layout for ``world_size`` ranks, without creating any group.

    Returns ``(tensor_groups, data_groups, pipeline_groups)``: each a list of rank lists, in the order
    ``initialize_model_parallel`` creates them. Raises ValueError when the sizes are < 1 or
    ``tensor_parallel_size * pipeline_parallel_size`` does not divide ``world_size``; TypeError when a
    size is not an int.
    """
    fn = "rank_layout"
    _check_size(fn, "world_size", world_size)
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    _check_size(fn, "tensor_parallel_size", tp)
    _check_size(fn, "pipeline_parallel_size", pp)
    _check_divides(fn, world_size, tp, pp)
    dp = world_size // (tp * pp)
    tensor = [list(range(start, start + tp)) for start in range(0, world_size, tp)]
    data = [
        list(range(stage * tp * dp + t, (stage + 1) * tp * dp, tp)) for stage in range(pp) for t in range(tp)
    ]
    pipeline = [list(range(first, world_size, tp * dp)) for first in range(tp * dp)]
    return tensor, data, pipeline


def _check_divides(fn: str, world_size: int, tp: int, pp: int) -> None:
    if world_size % tp:
        raise ValueError(f"{_PREFIX}.{fn}: tensor_parallel_size={tp} does not divide the world size {world_size}")
    if world_size % pp:
        raise ValueError(
            f"{_PREFIX}.{fn}: pipeline_parallel_size={pp} does not divide the world size {world_size}"
        )
    if world_size % (tp * pp):
        raise ValueError(
            f"{_PREFIX}.{fn}: tensor_parallel_size * pipeline_parallel_size = {tp} * {pp} = {tp * pp} "
            f"does not divide the world size {world_size}"
        )


def _new_groups(rank_lists: list[list[int]], rank: int, desc: str, member_only: bool = False):
    """Creates every group (every rank must call new_group for each, in the same order) and returns
    the one holding ``rank`` with its ranks. The groups get the default group's collective timeout
    (new_group alone would give gloo groups torch's 30 minutes, whatever init_process_group was given)."""
    from megacore.parallel.timeouts import group_timeout

    timeout = group_timeout()
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks=ranks, timeout=timeout, group_desc=desc)  # desc: in torch's logs and dumps
        if rank in ranks:
            mine = (group, tuple(ranks))
    if mine is None and member_only:  # a group only some ranks belong to (the embedding group)
        return None, ()
    assert mine is not None, f"rank {rank} is in none of {rank_lists}"
    return mine


def initialize_model_parallel(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1) -> ParallelState:
    """Builds the tensor-, data- and pipeline-parallel groups over the default torch.distributed group.

    Every rank must call it with the same arguments (it creates every group on every rank). The
    data-parallel size is ``world_size // (tensor_parallel_size * pipeline_parallel_size)``. The groups'
    collective timeout is the default group's (the ``timeout=`` of init_process_group).

    Returns the new ``ParallelState``. Raises RuntimeError when torch.distributed is not initialized or
    model parallel already is (call ``destroy_model_parallel`` first); ValueError when a size is < 1 or
    ``tensor_parallel_size * pipeline_parallel_size`` does not divide the world size; TypeError when a
    size is not an int.
    """
    global _STATE
    fn = "initialize_model_parallel"
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    _check_size(fn, "tensor_parallel_size", tp)
    _check_size(fn, "pipeline_parallel_size", pp)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{_PREFIX}.{fn}: torch.distributed is not initialized; call torch.distributed.init_process_group first"
        )
    if _STATE is not None:
        raise RuntimeError(
            f"{_PREFIX}.{fn}: model parallel is already initialized; call {_PREFIX}.destroy_model_parallel first"
        )
    world_size, rank = dist.get_world_size(), dist.get_rank()
    _check_divides(fn, world_size, tp, pp)
    dp = world_size // (tp * pp)
    tensor_lists, data_lists, pipeline_lists = rank_layout(world_size, tp, pp)
    tensor_group, tensor_ranks = _new_groups(tensor_lists, rank, "megacore_tensor_parallel")
    data_group, data_ranks = _new_groups(data_lists, rank, "megacore_data_parallel")
    pipeline_group, pipeline_ranks = _new_groups(pipeline_lists, rank, "megacore_pipeline_parallel")
    activation_group = gradient_group = embedding_group = None
    if pp > 1:
        activation_group, _ = _new_groups(pipeline_lists, rank, "megacore_pipeline_activations")
        gradient_group, _ = _new_groups(pipeline_lists, rank, "megacore_pipeline_gradients")
        embedding_lists = [[ranks[0], ranks[-1]] for ranks in pipeline_lists]
        group, ranks = _new_groups(embedding_lists, rank, "megacore_embedding", member_only=True)
        embedding_group = group if rank in ranks else None
    _STATE = ParallelState(
        tensor_parallel_size=tp,
        data_parallel_size=dp,
        pipeline_parallel_size=pp,
        tensor_parallel_rank=rank % tp,
        data_parallel_rank=(rank // tp) % dp,
        pipeline_parallel_rank=rank // (tp * dp),
        tensor_parallel_ranks=tensor_ranks,
        data_parallel_ranks=data_ranks,
        pipeline_parallel_ranks=pipeline_ranks,
        tensor_parallel_group=tensor_group,
        data_parallel_group=data_group,
        pipeline_parallel_group=pipeline_group,
        tensor_parallel_group_name=tensor_group.group_name,
        data_parallel_group_name=data_group.group_name,
        pipeline_parallel_group_name=pipeline_group.group_name,
        pipeline_activation_group=activation_group,
        pipeline_gradient_group=gradient_group,
        embedding_group=embedding_group,
        stage_groups={(0, pp - 1): embedding_group} if pp > 1 else {},
    )
    return _STATE


_PENDING_WORK_HOOKS: list = []  # callables that wait for asynchronous collectives still in flight


def add_pending_work_hook(hook) -> None:
    """Registers ``hook()``, which waits for asynchronous collectives its owner left in flight (the distributed
    optimizer's last parameter all-gathers); :func:`finish_pending_work` runs every hook."""
    if hook not in _PENDING_WORK_HOOKS:
        _PENDING_WORK_HOOKS.append(hook)


def finish_pending_work() -> None:
    """Waits for every registered owner's collectives still in flight. Call it before destroying process
    groups (``destroy_model_parallel`` does; call it before ``torch.distributed.destroy_process_group``): a gloo
    collective still running when its group is destroyed aborts the process."""
    for hook in list(_PENDING_WORK_HOOKS):
        hook()


def shutdown_distributed(barrier: bool = True) -> None:
    """Tears down torch.distributed in a worker that is done: waits for this process's collectives still in flight
    (:func:`finish_pending_work`), meets the other ranks at a barrier (``barrier=True``; pass False after a failure,
    when they may never come) so that no rank closes its connections while a peer still talks to it, resets the
    model-parallel state and destroys the default group (and with it every group). A no-op without one."""
    global _STATE
    if not dist.is_initialized():
        _STATE = None
        return
    finish_pending_work()
    if barrier:
        dist.barrier()
    _STATE = None
    dist.destroy_process_group()


def model_parallel_is_initialized() -> bool:
    """Returns True between ``initialize_model_parallel`` and ``destroy_model_parallel``. Never raises."""
    return _STATE is not None


def destroy_model_parallel() -> None:
    """Destroys the groups ``initialize_model_parallel`` made and resets the state, so it can be called
    again. A no-op when model parallel is not initialized; if the default group was already destroyed
    (which destroys every group) it only resets the state. Never raises for those cases."""
    global _STATE
    if _STATE is not None and dist.is_initialized():
        finish_pending_work()
    state, _STATE = _STATE, None
    if state is None or not dist.is_initialized():
        return
    groups = [state.tensor_parallel_group, state.data_parallel_group, state.pipeline_parallel_group,
              state.pipeline_activation_group, state.pipeline_gradient_group, state.embedding_group]
    groups += [g for g in state.stage_groups.values() if all(g is not other for other in groups)]
    for group in groups:
        if group is not None:
            dist.destroy_process_group(group)


def get_parallel_state() -> ParallelState:
    """Returns the current ``ParallelState``. Raises RuntimeError before ``initialize_model_parallel``."""
    return _require("get_parallel_state")


def _require(fn: str) -> ParallelState:
    if _STATE is None:
        raise RuntimeError(
            f"{_PREFIX}.{fn}: model parallel is not initialized; call {_PREFIX}.initialize_model_parallel first"
        )
    return _STATE


def require_tensor_parallel(who: str, divisible: Optional[dict[str, int]] = None, config_flag: bool = False
                            ) -> ParallelState:
    """The parallel state, for ``who`` (``"megacore.parallel.ColumnParallelLinear"``), which shards over the
    tensor-parallel group. Raises RuntimeError naming ``who`` before ``initialize_model_parallel`` (with
    ``config_flag``, as asked for by a ``tensor_parallel=True`` config, which can be turned off instead), and
    ValueError naming ``who`` and the field for each ``divisible`` size the tensor-parallel size does not
    divide. The one place that checks this: the layers, the transformer layer and the models call it."""
    if _STATE is None:
        if config_flag:
            raise RuntimeError(f"{who}: tensor_parallel=True but model parallel is not initialized; call "
                               f"{_PREFIX}.initialize_model_parallel first (or set tensor_parallel=False)")
        raise RuntimeError(f"{who}: model parallel is not initialized; call {_PREFIX}.initialize_model_parallel first")
    tp = _STATE.tensor_parallel_size
    for field, value in (divisible or {}).items():
        if value % tp:
            raise ValueError(f"{who}: {field}={value} is not divisible by the tensor-parallel size {tp}")
    return _STATE


def get_tensor_parallel_group() -> dist.ProcessGroup:
    """Returns this rank's tensor-parallel ProcessGroup. Raises RuntimeError before ``initialize_model_parallel``."""
    return _require("get_tensor_parallel_group").tensor_parallel_group


def get_tensor_parallel_rank() -> int:
    """Returns this rank's rank in its tensor-parallel group. Raises RuntimeError before
    ``initialize_model_parallel``."""
    return _require("get_tensor_parallel_rank").tensor_parallel_rank


def get_tensor_parallel_world_size() -> int:
    """Returns the tensor-parallel group size. Raises RuntimeError before ``initialize_model_parallel``."""
    return _require("get_tensor_parallel_world_size").tensor_parallel_size


def get_tensor_parallel_group_name() -> str:
    """Returns the tensor-parallel group's ``group_name`` (how C++ collectives resolve it). Raises
    RuntimeError before ``initialize_model_parallel``."""
    return _require("get_tensor_parallel_group_name").tensor_parallel_group_name


def get_data_parallel_group() -> dist.ProcessGroup:
    """Returns this rank's data-parallel ProcessGroup. Raises RuntimeError before ``initialize_model_parallel``."""
    return _require("get_data_parallel_group").data_parallel_group


def get_data_parallel_rank() -> int:
    """Returns this rank's rank in its data-parallel group. Raises RuntimeError before
    ``initialize_model_parallel``."""
    return _require("get_data_parallel_rank").data_parallel_rank


def get_data_parallel_world_size() -> int:
    """Returns the data-parallel group size. Raises RuntimeError before ``initialize_model_parallel``."""
    return _require("get_data_parallel_world_size").data_parallel_size


def get_data_parallel_group_name() -> str:
    """Returns the data-parallel group's ``group_name`` (how C++ collectives resolve it). Raises
    RuntimeError before ``initialize_model_parallel``."""
    return _require("get_data_parallel_group_name").data_parallel_group_name


def get_pipeline_parallel_group() -> dist.ProcessGroup:
    """Returns this rank's pipeline-parallel ProcessGroup. Raises RuntimeError before ``initialize_model_parallel``."""
    return _require("get_pipeline_parallel_group").pipeline_parallel_group


def get_pipeline_parallel_rank() -> int:
    """Returns this rank's rank in its pipeline-parallel group. Raises RuntimeError before
    ``initialize_model_parallel``."""
    return _require("get_pipeline_parallel_rank").pipeline_parallel_rank


def get_pipeline_parallel_world_size() -> int:
    """Returns the pipeline-parallel group size. Raises RuntimeError before ``initialize_model_parallel``."""
    return _require("get_pipeline_parallel_world_size").pipeline_parallel_size


def get_pipeline_stages_group(stages: tuple[int, ...]) -> Optional[dist.ProcessGroup]:
    """The group of pipeline stages ``stages`` (ascending stage indices, at least two) of this rank's pipeline: the
    ranks at this rank's tensor- and data-parallel position on those stages (for stages (0, P - 1), the embedding
    group). None when this rank's stage is not among them. The first call for a set of stages creates its group
    in every pipeline, a collective over the world: every rank must then call it with the same stages, in the same
    order. Raises RuntimeError before ``initialize_model_parallel``, ValueError for stages out of order or range."""
    fn = "get_pipeline_stages_group"
    state = _require(fn)
    key = tuple(stages)
    pp = state.pipeline_parallel_size
    if len(key) < 2 or list(key) != sorted(set(key)) or key[0] < 0 or key[-1] >= pp:
        raise ValueError(f"{_PREFIX}.{fn}: stages={key!r} must be at least two ascending stage indices in [0, {pp})")
    if key not in state.stage_groups:
        _, _, pipeline_lists = rank_layout(dist.get_world_size(), state.tensor_parallel_size, pp)
        group, _ = _new_groups([[ranks[i] for i in key] for ranks in pipeline_lists], dist.get_rank(),
                               "megacore_pipeline_stages", member_only=True)
        state.stage_groups[key] = group
    return state.stage_groups[key]


def get_pipeline_parallel_group_name() -> str:
    """Returns the pipeline-parallel group's ``group_name`` (how C++ collectives resolve it). Raises
    RuntimeError before ``initialize_model_parallel``."""
    return _require("get_pipeline_parallel_group_name").pipeline_parallel_group_name
