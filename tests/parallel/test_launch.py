"""megacore.parallel.launch.init_from_torchrun, the one torchrun set-up (megacore train and megacore generate
go through it; both run under torchrun in tests/training/test_run.py): what it refuses before touching
torch.distributed, and that one process with every size 1 needs no grid."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from megacore.parallel import model_parallel_is_initialized
from megacore.parallel.launch import init_from_torchrun


def test_one_process_with_every_size_one_needs_no_grid(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_torchrun(1, 1) is None and init_from_torchrun(None) is None
    assert not dist.is_initialized() and not model_parallel_is_initialized()


@pytest.mark.parametrize("world, tp, pp, message", [
    (1, 2, 1, "megacore train: --tensor-parallel-size 2 needs 2 processes: torchrun --nproc-per-node 2 -m megacore"),
    (1, 2, 2, "megacore train: --tensor-parallel-size 2 × --pipeline-parallel-size 2 needs 4 processes"),
    (1, 1, 3, "megacore train: --pipeline-parallel-size 3 needs 3 processes"),
    (6, 4, 1, "megacore train: --tensor-parallel-size 4 does not divide the 6 processes (torchrun --nproc-per-node)"),
    (8, 2, 3, "megacore train: --tensor-parallel-size 2 × --pipeline-parallel-size 3 = 6 does not divide the 8 processes"),
])
def test_impossible_layouts_are_refused_before_any_process_group(world, tp, pp, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ValueError) as e:
        init_from_torchrun(tp, pp, who="megacore train")
    assert str(e.value).startswith(message), str(e.value)
    assert not dist.is_initialized()
