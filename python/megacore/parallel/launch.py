"""Process-group set-up from torchrun's environment: the one place ``megacore train``, ``megacore generate``
and a user's script go through (torch.distributed with the backend for this machine and this process's GPU,
then megacore's tensor/pipeline/data-parallel grid)."""

from __future__ import annotations

import os
from typing import Optional

from megacore.parallel import state
from megacore.parallel.timeouts import init_distributed


def torchrun_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_torchrun(tensor_parallel_size: Optional[int] = 1, pipeline_parallel_size: int = 1,
                       timeout_minutes: Optional[float] = None, who: str = "megacore"
                       ) -> Optional[state.ParallelState]:
    """Initializes torch.distributed (``init_distributed``: NCCL and this process's GPU when CUDA is
    available, else gloo; ``timeout_minutes`` for every collective) and megacore's parallel grid over
    torchrun's processes: tensor-parallel size ``tensor_parallel_size`` (None: every process), pipeline size
    ``pipeline_parallel_size``, the rest data parallel. A grid already initialized is replaced.

    Returns the ParallelState, or None for a single process that needs no grid (every size 1). Raises
    ValueError naming ``who`` (``"megacore train"``) when the sizes need more processes than torchrun
    started, or do not divide their number; the message says how to launch instead."""
    world = torchrun_world_size()
    tp = world if tensor_parallel_size is None else tensor_parallel_size
    pp = pipeline_parallel_size
    if world == 1 and tp == 1 and pp == 1:
        return None
    model = tp * pp
    flags = " × ".join(f for f in (f"--tensor-parallel-size {tp}" if tp > 1 else "",
                                   f"--pipeline-parallel-size {pp}" if pp > 1 else "") if f)
    if world == 1:
        raise ValueError(f"{who}: {flags} needs {model} processes: torchrun --nproc-per-node {model} "
                         f"-m megacore ...")
    if world % model:
        product = flags if (tp > 1) + (pp > 1) == 1 else f"{flags} = {model}"
        raise ValueError(f"{who}: {product} does not divide the {world} processes (torchrun "
                         "--nproc-per-node); data-parallel size = processes / (tensor-parallel size × pipeline size) "
                         "must be a whole number")
    init_distributed(timeout_minutes)
    if state.model_parallel_is_initialized():
        state.destroy_model_parallel()
    return state.initialize_model_parallel(tp, pp)


__all__ = ["init_from_torchrun", "torchrun_world_size"]
