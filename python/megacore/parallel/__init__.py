"""megacore.parallel: tensor-, data- and pipeline-parallel process groups (Megatron-LM layout).

Call ``initialize_model_parallel(tensor_parallel_size, pipeline_parallel_size)`` on every rank after
``torch.distributed.init_process_group``; then the ``get_*`` accessors return this rank's groups,
ranks, sizes and group names. ``destroy_model_parallel`` undoes it.
"""

from megacore.parallel.state import (
    ParallelState,
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_group_name,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_parallel_state,
    get_pipeline_parallel_group,
    get_pipeline_parallel_group_name,
    get_pipeline_parallel_rank,
    get_pipeline_parallel_world_size,
    get_tensor_parallel_group,
    get_tensor_parallel_group_name,
    get_tensor_parallel_rank,
    get_tensor_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
    rank_layout,
)

__all__ = [
    "ParallelState",
    "destroy_model_parallel",
    "get_data_parallel_group",
    "get_data_parallel_group_name",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    "get_parallel_state",
    "get_pipeline_parallel_group",
    "get_pipeline_parallel_group_name",
    "get_pipeline_parallel_rank",
    "get_pipeline_parallel_world_size",
    "get_tensor_parallel_group",
    "get_tensor_parallel_group_name",
    "get_tensor_parallel_rank",
    "get_tensor_parallel_world_size",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "rank_layout",
]
