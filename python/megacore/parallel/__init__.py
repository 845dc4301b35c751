"""megacore.parallel: tensor-, data- and pipeline-parallel process groups (Megatron-LM layout).

Call ``initialize_model_parallel(tensor_parallel_size, pipeline_parallel_size)`` on every rank after
``torch.distributed.init_process_group``; then the ``get_*`` accessors return this rank's groups,
ranks, sizes and group names. ``destroy_model_parallel`` undoes it.

Collectives implemented in C++ (``torch.ops.megacore.all_reduce / all_gather / reduce_scatter``, the
group resolved by name, every wait bounded by the group's timeout) are in ``megacore.parallel.collectives``;
the autograd-aware tensor- and sequence-parallel mappings built on them are in
``megacore.parallel.mappings``. Both work in eager mode and under ``torch.compile(fullgraph=True)``.

``init_distributed(timeout_minutes)`` initializes torch.distributed with that collective timeout, and
``report_stalled_ranks(where)`` turns a collective that timed out into a ``StalledRanksError`` naming the
collective, its group and the ranks that did not arrive (``megacore.parallel.timeouts``).
"""

from megacore.parallel import collectives, mappings  # noqa: F401  (registers fake kernels and autograd)
from megacore.parallel.collectives import all_gather, all_reduce, reduce_scatter
from megacore.parallel.cross_entropy import vocab_parallel_cross_entropy
from megacore.parallel.distributed import DistributedDataParallel
from megacore.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    merge_weights,
    split_weight,
)
from megacore.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)

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
    get_pipeline_stages_group,
    get_tensor_parallel_group,
    get_tensor_parallel_group_name,
    get_tensor_parallel_rank,
    get_tensor_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
    rank_layout,
    require_tensor_parallel,
)
from megacore.parallel.sharding import ParallelPlan, sum_sequence_parallel_gradients
from megacore.parallel.timeouts import (
    StalledRanksError,
    default_timeout_minutes,
    init_distributed,
    report_stalled_ranks,
)

__all__ = [
    "ColumnParallelLinear",
    "DistributedDataParallel",
    "ParallelPlan",
    "ParallelState",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "merge_weights",
    "split_weight",
    "sum_sequence_parallel_gradients",
    "vocab_parallel_cross_entropy",
    "all_gather",
    "all_reduce",
    "collectives",
    "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_parallel_region",
    "mappings",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tensor_parallel_region",
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
    "get_pipeline_stages_group",
    "get_tensor_parallel_group",
    "get_tensor_parallel_group_name",
    "get_tensor_parallel_rank",
    "get_tensor_parallel_world_size",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
    "rank_layout",
    "require_tensor_parallel",
    "StalledRanksError",
    "default_timeout_minutes",
    "init_distributed",
    "report_stalled_ranks",
]
