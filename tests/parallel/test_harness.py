"""The multi-process harness itself: results, failures and hangs are reported, never hung on."""

import pytest
import torch
import torch.distributed as dist

from tests.parallel.utils import run_distributed


def _all_reduce_sum(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world_size * (world_size + 1) / 2


def _fails_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")


def _hangs_on_rank_0(rank, world_size):
    if rank == 0:
        import time

        time.sleep(60)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_all_reduce_across_real_processes(world_size):
    run_distributed(_all_reduce_sum, world_size)


def test_a_worker_failure_reports_its_traceback():
    with pytest.raises(AssertionError, match="rank 1 of 2 failed(.|\n)*boom on rank 1"):
        run_distributed(_fails_on_rank_1, 2)


def test_a_hang_is_killed_and_reported():
    with pytest.raises(AssertionError, match=r"ranks \[0\] of 2 still running"):
        run_distributed(_hangs_on_rank_0, 2, timeout_s=8)
