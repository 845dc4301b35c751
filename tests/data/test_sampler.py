"""The distributed, resumable samplers: sharding by data-parallel rank and resume equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megacore.data import PretrainingSampler, RandomPretrainingSampler


def global_steps(make, data_parallel_size, steps):
    """The first `steps` global steps: per step, the micro-batches of ranks 0..D-1."""
    iterators = [iter(make(rank)) for rank in range(data_parallel_size)]
    return [[next(it) for it in iterators] for _ in range(steps)]


# ---- sequential ------------------------------------------------------------------------------------------


def test_sequential_sampler_gives_each_rank_its_slice_of_each_global_step():
    make = lambda rank: PretrainingSampler(50, 0, micro_batch_size=3, data_parallel_rank=rank, data_parallel_size=4)
    steps = [list(zip(*[make(r) for r in range(4)]))][0]
    assert len(steps) == 4 == len(make(0))  # 50 // 12 full global steps; the last 2 samples dropped
    for k, step in enumerate(steps):
        assert [i for batch in step for i in batch] == list(range(12 * k, 12 * k + 12))


def test_sequential_sampler_without_drop_last_hands_out_the_rest():
    parts = [list(PretrainingSampler(14, 0, 3, rank, 4, drop_last=False)) for rank in range(4)]
    assert parts[0][-1] == [12, 13] and len(parts[1]) == 1 and len(parts[0]) == 2 == len(PretrainingSampler(14, 0, 3, 0, 4, drop_last=False))


@pytest.mark.parametrize("data_parallel_size", [1, 2, 3])
def test_sequential_sampler_resumes_with_the_batches_an_uninterrupted_run_sees_next(data_parallel_size):
    M, total = 2, 61
    step = M * data_parallel_size
    for rank in range(data_parallel_size):
        full = list(PretrainingSampler(total, 0, M, rank, data_parallel_size))
        for done in range(len(full) + 1):
            resumed = list(PretrainingSampler(total, done * step, M, rank, data_parallel_size))
            assert resumed == full[done:], (rank, done)


def test_sequential_sampler_tracks_consumed_samples_and_state_dict():
    sampler = PretrainingSampler(100, 0, 4, 1, 2)
    it = iter(sampler)
    next(it), next(it)
    assert sampler.state_dict() == {"consumed_samples": 16}
    other = PretrainingSampler(100, 0, 4, 1, 2)
    other.load_state_dict(sampler.state_dict())
    assert list(other) == list(it)


# ---- random ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data_sharding", [True, False])
def test_random_sampler_epoch_covers_each_sample_once_across_ranks(data_sharding):
    D, M, total = 3, 4, 100  # epoch = 96 samples
    make = lambda rank: RandomPretrainingSampler(total, 0, M, rank, D, seed=1, data_sharding=data_sharding)
    steps = global_steps(make, D, len(make(0)))
    assert len(steps) == 8
    seen = [i for step in steps for batch in step for i in batch]
    assert len(seen) == 96 == len(set(seen)) and max(seen) < total
    assert seen != sorted(seen)  # shuffled


@pytest.mark.parametrize("data_sharding", [True, False])
@pytest.mark.parametrize("data_parallel_size", [1, 2, 4])
def test_random_sampler_resume_at_any_step_equals_uninterrupted_run_across_epochs(data_sharding, data_parallel_size):
    M, total, seed = 3, 50, 7
    step = M * data_parallel_size
    for rank in range(data_parallel_size):
        sampler = RandomPretrainingSampler(total, 0, M, rank, data_parallel_size, seed, data_sharding)
        full = [b for _ in range(3) for b in sampler]  # three epochs, iter() once per epoch
        per_epoch = len(full) // 3
        assert per_epoch == total // step
        for done in range(len(full)):
            resumed_sampler = RandomPretrainingSampler(total, done * step, M, rank, data_parallel_size, seed,
                                                       data_sharding)
            resumed = list(resumed_sampler)  # to the end of the epoch it resumes in
            end_of_epoch = (done // per_epoch + 1) * per_epoch
            assert resumed == full[done:end_of_epoch], (rank, done)
            if end_of_epoch < len(full):  # then the next epoch, on the next iter()
                assert list(resumed_sampler) == full[end_of_epoch:end_of_epoch + per_epoch], (rank, done)


def test_random_sampler_epochs_and_seeds_give_different_orders():
    a = RandomPretrainingSampler(64, 0, 4, 0, 1, seed=0)
    first, second = list(a), list(a)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(64))
    assert list(RandomPretrainingSampler(64, 0, 4, 0, 1, seed=1)) != first
    assert list(RandomPretrainingSampler(64, 0, 4, 0, 1, seed=0)) == first


def test_random_sampler_rejects_mid_step_resume_and_bad_sizes():
    with pytest.raises(ValueError, match="multiple of micro_batch_size \\* data_parallel_size = 8"):
        RandomPretrainingSampler(100, 4, 4, 0, 2)
    with pytest.raises(ValueError, match="smaller than one global step"):
        RandomPretrainingSampler(7, 0, 4, 0, 2)
    with pytest.raises(ValueError, match=r"data_parallel_rank must be in \[0, 2\)"):
        RandomPretrainingSampler(100, 0, 4, 2, 2)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        PretrainingSampler(100, 0, 0)
    with pytest.raises(ValueError, match="exceeds total_samples"):
        PretrainingSampler(100, 101, 1)
    with pytest.raises(ValueError, match="seed 3"):
        RandomPretrainingSampler(100, 0, 4, seed=5).load_state_dict({"consumed_samples": 0, "seed": 3})


def test_samplers_work_as_dataloader_batch_samplers():
    data = torch.arange(40)
    loader = torch.utils.data.DataLoader(data, batch_sampler=PretrainingSampler(40, 8, 4, 1, 2))
    batches = [b.tolist() for b in loader]
    assert batches[0] == [12, 13, 14, 15] and len(batches) == 4
    loader = torch.utils.data.DataLoader(data, batch_sampler=RandomPretrainingSampler(40, 0, 4, 0, 2, seed=3))
    assert len(loader) == 5 and all(b.shape == (4,) for b in loader)
