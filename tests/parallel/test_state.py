"""megacore.parallel state: Megatron's rank layout, real groups (checked with collectives in spawned
gloo processes), destroy/re-initialize, and every error."""

import pytest
import torch
import torch.distributed as dist

import megacore.parallel as mp
from tests.parallel.utils import run_distributed

CONFIGS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)]  # (tensor, pipeline) parallel sizes


def _configs(world_size):
    return [(tp, pp) for tp, pp in CONFIGS if world_size % (tp * pp) == 0]


def _expected(rank, world_size, tp, pp):
    """This rank's coordinates and groups, straight from rank = t + tp*d + tp*dp*p."""
    dp = world_size // (tp * pp)
    t, d, p = rank % tp, (rank // tp) % dp, rank // (tp * dp)

    def at(t, d, p):
        return t + tp * d + tp * dp * p

    assert at(t, d, p) == rank
    return dict(
        sizes=(tp, dp, pp),
        coords=(t, d, p),
        tensor=[at(i, d, p) for i in range(tp)],
        data=[at(t, i, p) for i in range(dp)],
        pipeline=[at(t, d, i) for i in range(pp)],
    )


def _members(group, world_size):
    """Who is in ``group``, by a real all_reduce: each rank contributes a one-hot of its global rank."""
    onehot = torch.zeros(world_size)
    onehot[dist.get_rank()] = 1.0
    dist.all_reduce(onehot, group=group)
    return [r for r in range(world_size) if onehot[r] == 1.0]


def _check_config(rank, world_size, tp, pp):
    state = mp.initialize_model_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    exp = _expected(rank, world_size, tp, pp)
    assert mp.model_parallel_is_initialized() and mp.get_parallel_state() is state
    sizes = (
        mp.get_tensor_parallel_world_size(),
        mp.get_data_parallel_world_size(),
        mp.get_pipeline_parallel_world_size(),
    )
    coords = (mp.get_tensor_parallel_rank(), mp.get_data_parallel_rank(), mp.get_pipeline_parallel_rank())
    assert (sizes, coords) == (exp["sizes"], exp["coords"]), (tp, pp)
    groups = {
        "tensor": (mp.get_tensor_parallel_group(), mp.get_tensor_parallel_group_name(), state.tensor_parallel_ranks),
        "data": (mp.get_data_parallel_group(), mp.get_data_parallel_group_name(), state.data_parallel_ranks),
        "pipeline": (
            mp.get_pipeline_parallel_group(),
            mp.get_pipeline_parallel_group_name(),
            state.pipeline_parallel_ranks,
        ),
    }
    for i, (dim, (group, name, ranks)) in enumerate(groups.items()):
        where = (tp, pp, dim)
        assert list(ranks) == exp[dim], where
        assert dist.get_process_group_ranks(group) == exp[dim], where
        assert dist.get_rank(group) == coords[i], where
        assert _members(group, world_size) == exp[dim], where
        assert isinstance(name, str) and name == group.group_name, where
        names = [None] * len(ranks)
        dist.all_gather_object(names, name, group=group)
        assert names == [name] * len(ranks), (where, "members disagree on the group name")
    assert len({name for _, name, _ in groups.values()}) == 3, "group names must be distinct"
    stage_group = None
    if pp > 1:
        assert mp.get_pipeline_stages_group((0, pp - 1)) is state.embedding_group
        stages = (0, pp - 2, pp - 1) if pp > 2 else (0, 1)  # PP 4: a group the other stages are not in
        stage_group = mp.get_pipeline_stages_group(stages)
        assert mp.get_pipeline_stages_group(stages) is stage_group  # made once
        if coords[2] in stages:
            assert _members(stage_group, world_size) == [exp["pipeline"][i] for i in stages]
        else:
            assert stage_group is None
        for bad in [(0,), (1, 0), (0, pp)]:
            with pytest.raises(ValueError, match=r"get_pipeline_stages_group: stages=.* must be at least two"):
                mp.get_pipeline_stages_group(bad)

    with pytest.raises(RuntimeError, match="initialize_model_parallel: model parallel is already initialized"):
        mp.initialize_model_parallel(tp, pp)
    assert mp.get_parallel_state() is state, "a refused second initialize must keep the state"

    mp.destroy_model_parallel()
    assert not mp.model_parallel_is_initialized()
    pg_map = dist.distributed_c10d._world.pg_map
    assert all(g not in pg_map for g, _, _ in groups.values()), "destroy must destroy the groups it made"
    assert stage_group is None or stage_group not in pg_map, "destroy must destroy the groups of stages"
    with pytest.raises(RuntimeError, match="initialize_model_parallel first"):
        mp.get_tensor_parallel_rank()
    mp.destroy_model_parallel()  # a second destroy is a no-op


def _check_errors(world_size):
    bad = [
        (dict(tensor_parallel_size=0), ValueError, "tensor_parallel_size=0 must be >= 1"),
        (dict(pipeline_parallel_size=-1), ValueError, "pipeline_parallel_size=-1 must be >= 1"),
        (dict(tensor_parallel_size=2.0), TypeError, "tensor_parallel_size must be an int, got float"),
        (dict(tensor_parallel_size=True), TypeError, "tensor_parallel_size must be an int, got bool"),
        (
            dict(tensor_parallel_size=world_size + 1),
            ValueError,
            f"tensor_parallel_size={world_size + 1} does not divide the world size {world_size}",
        ),
        (
            dict(pipeline_parallel_size=world_size + 1),
            ValueError,
            f"pipeline_parallel_size={world_size + 1} does not divide the world size {world_size}",
        ),
    ]
    if world_size == 4:
        bad.append(
            (dict(tensor_parallel_size=3), ValueError, "tensor_parallel_size=3 does not divide the world size 4")
        )
        bad.append(
            (
                dict(tensor_parallel_size=4, pipeline_parallel_size=2),
                ValueError,
                r"tensor_parallel_size \* pipeline_parallel_size = 4 \* 2 = 8 does not divide the world size 4",
            )
        )
    for kwargs, error, message in bad:
        with pytest.raises(error, match="^megacore.parallel.initialize_model_parallel: " + message):
            mp.initialize_model_parallel(**kwargs)
        assert not mp.model_parallel_is_initialized(), kwargs


def _all_configs(rank, world_size):
    _check_errors(world_size)
    for tp, pp in _configs(world_size):
        _check_config(rank, world_size, tp, pp)
    # Defaults: everything data parallel; and a final re-initialization after all the destroys.
    mp.initialize_model_parallel()
    assert mp.get_data_parallel_world_size() == world_size and mp.get_data_parallel_rank() == rank
    assert _members(mp.get_data_parallel_group(), world_size) == list(range(world_size))
    mp.destroy_model_parallel()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_groups_follow_megatron_layout_in_real_processes(world_size):
    run_distributed(_all_configs, world_size, timeout_s=90)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8, 16])
def test_rank_layout_partitions_the_world(world_size):
    for tp, pp in _configs(world_size):
        tensor, data, pipeline = mp.rank_layout(world_size, tp, pp)
        for groups, dim in ((tensor, "tensor"), (data, "data"), (pipeline, "pipeline")):
            assert sorted(r for g in groups for r in g) == list(range(world_size)), (tp, pp, dim)
            for g in groups:
                for r in g:
                    assert g == _expected(r, world_size, tp, pp)[dim], (tp, pp, dim, r)


def test_rank_layout_rejects_bad_sizes():
    with pytest.raises(ValueError, match="^megacore.parallel.rank_layout: tensor_parallel_size=3 does not divide"):
        mp.rank_layout(4, 3, 1)
    with pytest.raises(ValueError, match="^megacore.parallel.rank_layout: world_size=0 must be >= 1"):
        mp.rank_layout(0, 1, 1)


def test_without_torch_distributed():
    assert not dist.is_initialized()
    assert not mp.model_parallel_is_initialized()
    with pytest.raises(
        RuntimeError, match="^megacore.parallel.initialize_model_parallel: torch.distributed is not initialized"
    ):
        mp.initialize_model_parallel()
    accessors = [
        f"get_{dim}_parallel_{what}"
        for dim in ("tensor", "data", "pipeline")
        for what in ("group", "rank", "world_size", "group_name")
    ] + ["get_parallel_state"]
    for name in accessors:
        message = "model parallel is not initialized; call megacore.parallel.initialize_model_parallel first"
        with pytest.raises(RuntimeError, match=f"^megacore.parallel.{name}: {message}"):
            getattr(mp, name)()
    mp.destroy_model_parallel()  # a no-op when not initialized


def test_public_functions_have_docstrings():
    for name in mp.__all__:
        assert getattr(mp, name).__doc__, name
