"""megacore.parallel.DistributedDataParallel across real gloo processes.

The reference is one process on the whole batch: N ranks, each on its shard with a mean loss, must
end backward with the whole batch's mean-loss gradients. Every rank builds the same model and batch
from fixed seeds, so the reference is computed locally on every rank. Checks are grouped into one
spawned run per world size to keep the multi-process start-up cost low.
"""

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.parallel.utils import run_distributed

BATCH = 8  # divisible by every world size and by the micro-batch count
TINY_BUCKETS_MB = 300 / 2**20  # ~300 bytes: the model below spreads over several buckets


class _Net(nn.Module):
    """A small MLP with an optional layer that only some ranks use (an unused parameter)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16, dtype=dtype)
        self.fc2 = nn.Linear(16, 16, dtype=dtype)
        self.extra = nn.Linear(16, 16, dtype=dtype)
        self.head = nn.Linear(16, 3, dtype=dtype)

    def forward(self, x, use_extra=False):
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        if use_extra:
            h = h + self.extra(h)
        return self.head(h)


def _batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 6, generator=g).to(dtype), torch.randn(BATCH, 3, generator=g).to(dtype)


def _shard(t, rank, world_size):
    return t.chunk(world_size)[rank]


def _loss(model, x, y, use_extra=False):
    return (model(x, use_extra) - y).square().mean()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads(ddp, want, *, attr="grad", rtol=1e-5, atol=1e-6):
    for name, p in ddp.named_parameters():
        got = getattr(p, attr)
        torch.testing.assert_close(got.float(), want[name].float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _check_equivalence_and_overlap(rank, world_size):
    from megacore.parallel import DistributedDataParallel

    reference, model = _Net(), _Net()
    ddp = DistributedDataParallel(model, bucket_size_mb=TINY_BUCKETS_MB)
    reducer = ddp.reducer
    assert reducer.world_size() == world_size
    assert reducer.num_buckets() >= 3, reducer.bucket_sizes_bytes()
    # Reverse registration order: the head (last layer) is in bucket 0, fc1 in the last bucket.
    assert reducer.bucket_params(0)[0] == 0 and ddp._params[0] is model.head.bias
    # A bucket closes once it reaches the size: all but the last hold >= 300 bytes; each param once.
    assert all(size >= 300 for size in reducer.bucket_sizes_bytes()[:-1])
    in_buckets = sorted(i for b in range(reducer.num_buckets()) for i in reducer.bucket_params(b))
    assert in_buckets == list(range(reducer.num_params())) == list(range(8))

    x, y = _batch(1)
    _loss(reference, x, y, use_extra=True).backward()
    want = _grads(reference)

    xs = _shard(x, rank, world_size).clone().requires_grad_()
    launched_when_backward_reached_the_input = []
    xs.register_hook(lambda g: launched_when_backward_reached_the_input.append(reducer.num_allreduces_launched()))
    _loss(ddp, xs, _shard(y, rank, world_size), use_extra=True).backward()
    _assert_grads(ddp, want)
    _assert_grads(ddp, want, attr="main_grad")
    for p in ddp.parameters():
        assert p.grad.data_ptr() == p.main_grad.data_ptr(), "param.grad is not the bucket view"
    # Overlap: buckets were reduced while backward was still running (before it reached the input).
    assert launched_when_backward_reached_the_input[0] >= 1
    assert reducer.num_allreduces_launched_during_backward() >= 1
    assert reducer.num_allreduces_launched() == reducer.num_buckets()

    # Checkpoints look like the bare model's, and load back.
    assert list(ddp.state_dict()) == list(reference.state_dict())
    assert [n for n, _ in ddp.named_parameters()] == [n for n, _ in reference.named_parameters()]
    ddp.load_state_dict(reference.state_dict())
    assert dict(nn.ModuleDict({"m": ddp}).state_dict()).keys() == {f"m.{k}" for k in reference.state_dict()}


def _check_accumulation(rank, world_size, micro_batches=2):
    from megacore.parallel import DistributedDataParallel

    reference, ddp = _Net(), DistributedDataParallel(_Net(), bucket_size_mb=TINY_BUCKETS_MB)
    x, y = _batch(2)
    _loss(reference, x, y).backward()
    want = _grads(reference)

    want.update({"extra.weight": torch.zeros(16, 16), "extra.bias": torch.zeros(16)})
    xs, ys = _shard(x, rank, world_size), _shard(y, rank, world_size)
    micro = list(zip(xs.chunk(micro_batches), ys.chunk(micro_batches)))
    for set_to_none in (False, True):  # the second round starts from param.grad = None
        ddp.zero_grad(set_to_none=set_to_none)
        before = ddp.reducer.num_allreduces_launched()
        with ddp.no_sync():
            for mx, my in micro[:-1]:
                (_loss(ddp, mx, my) / micro_batches).backward()
        assert ddp.reducer.num_allreduces_launched() == before, "no_sync reduced"
        (_loss(ddp, *micro[-1]) / micro_batches).backward()
        assert ddp.reducer.num_allreduces_launched() == before + ddp.reducer.num_buckets()
        _assert_grads(ddp, want)


def _check_unused_and_zero_grad(rank, world_size):
    """Even ranks use `extra`, odd ranks do not; two SGD steps with zero_grad(set_to_none=True) between."""
    from megacore.parallel import DistributedDataParallel

    reference, ddp = _Net(), DistributedDataParallel(_Net(), bucket_size_mb=TINY_BUCKETS_MB)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(2):
        x, y = _batch(10 + step)
        # Reference: the sum over ranks of each rank's mean loss on its shard, divided by the world size.
        for r in range(world_size):
            (_loss(reference, _shard(x, r, world_size), _shard(y, r, world_size), r % 2 == 0) / world_size).backward()
        want = _grads(reference)
        assert "extra.weight" in want  # rank 0 uses it
        _loss(ddp, _shard(x, rank, world_size), _shard(y, rank, world_size), rank % 2 == 0).backward()
        _assert_grads(ddp, want)
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in ddp.parameters())
    for (name, p), q in zip(ddp.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

    # A parameter no rank uses after set_to_none: zero gradient, not the stale one, and no hang.
    x, y = _batch(20)
    _loss(ddp, _shard(x, rank, world_size), _shard(y, rank, world_size)).backward()
    extra = ddp.module.extra.weight
    assert extra.grad.data_ptr() == extra.main_grad.data_ptr() and torch.count_nonzero(extra.grad) == 0
    ddp.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in ddp.parameters())


def _check_bf16_params_fp32_grads(rank, world_size):
    from megacore.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(_Net(torch.bfloat16), bucket_size_mb=TINY_BUCKETS_MB, grad_dtype=torch.float32)
    local = _Net(torch.bfloat16)
    x, y = _batch(3, torch.bfloat16)
    # Reference: the same bf16 math per shard, averaged in fp32.
    want = {}
    for r in range(world_size):
        local.zero_grad(set_to_none=True)
        _loss(local, _shard(x, r, world_size), _shard(y, r, world_size)).backward()
        for n, g in _grads(local).items():
            want[n] = want.get(n, 0) + g.float() / world_size
    want.update({"extra.weight": torch.zeros(16, 16), "extra.bias": torch.zeros(16)})
    for _ in range(2):  # the second backward accumulates onto the first
        _loss(ddp, _shard(x, rank, world_size), _shard(y, rank, world_size)).backward()
    for name, p in ddp.named_parameters():
        assert p.dtype == torch.bfloat16 and p.main_grad.dtype == torch.float32 and p.grad is None, name
    _assert_grads(ddp, {n: 2 * g for n, g in want.items()}, attr="main_grad", rtol=1e-5, atol=1e-5)
    ddp.zero_grad_buffers()
    assert all(torch.count_nonzero(p.main_grad) == 0 for p in ddp.parameters())


def _check_model_parallel_group(rank, world_size):
    """With tensor_parallel_size=2, the default group is the data-parallel one; other sizes are refused."""
    from megacore import parallel as mp
    from megacore.parallel import DistributedDataParallel

    mp.initialize_model_parallel(tensor_parallel_size=2)
    try:
        reference = _Net()
        ddp = DistributedDataParallel(_Net(), bucket_size_mb=TINY_BUCKETS_MB)
        dp, dp_rank = mp.get_data_parallel_world_size(), mp.get_data_parallel_rank()
        assert ddp.reducer.world_size() == dp == world_size // 2
        x, y = _batch(4)
        _loss(reference, x, y).backward()
        _loss(ddp, _shard(x, dp_rank, dp), _shard(y, dp_rank, dp)).backward()
        _assert_grads(ddp, {**_grads(reference), "extra.weight": torch.zeros(16, 16), "extra.bias": torch.zeros(16)})
        with pytest.raises(ValueError, match=r"DistributedDataParallel: data_parallel_group has \d ranks, expected"):
            DistributedDataParallel(_Net(), data_parallel_group=dist.group.WORLD)
    finally:
        mp.destroy_model_parallel()


def _check_errors(rank, world_size):
    from megacore.parallel import DistributedDataParallel

    name = "megacore.parallel.DistributedDataParallel"
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{name}: bucket_size_mb={bad} must be a finite number > 0"):
            DistributedDataParallel(_Net(), bucket_size_mb=bad)
    with pytest.raises(TypeError, match=f"{name}: bucket_size_mb must be a number"):
        DistributedDataParallel(_Net(), bucket_size_mb="25")
    with pytest.raises(TypeError, match=f"{name}: grad_dtype must be None or a floating torch.dtype"):
        DistributedDataParallel(_Net(), grad_dtype=torch.int32)
    with pytest.raises(TypeError, match=f"{name}: module must be a torch.nn.Module"):
        DistributedDataParallel(lambda x: x)
    with pytest.raises(ValueError, match=f"{name}: the module has no parameter that requires grad"):
        DistributedDataParallel(_Net().requires_grad_(False))
    with pytest.raises(ValueError, match=f"{name}: data_parallel_group 'no-such-group' names no registered"):
        DistributedDataParallel(_Net(), data_parallel_group="no-such-group")
    with pytest.raises(ValueError, match=r"Reducer.mark_ready: parameter index 99 is out of range \[0, 8\)"):
        DistributedDataParallel(_Net()).reducer.mark_ready(99)
    if world_size > 1:
        group = dist.new_group([0])  # every rank must call new_group; only rank 0 is in it
        if rank != 0:
            with pytest.raises(ValueError, match=f"{name}: this rank \\(global rank {rank}\\) is not a member"):
                DistributedDataParallel(_Net(), data_parallel_group=group)


def _all_checks(rank, world_size):
    _check_equivalence_and_overlap(rank, world_size)
    _check_accumulation(rank, world_size)
    _check_unused_and_zero_grad(rank, world_size)
    _check_bf16_params_fp32_grads(rank, world_size)
    if world_size > 1:
        _check_model_parallel_group(rank, world_size)
    _check_errors(rank, world_size)
    dist.barrier()


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ddp_matches_one_rank_on_the_whole_batch(world_size):
    run_distributed(_all_checks, world_size, timeout_s=120)


def _rank_0_skips_backward(rank, world_size):
    from megacore.parallel import DistributedDataParallel

    group = dist.new_group(timeout=timedelta(seconds=3))
    ddp = DistributedDataParallel(_Net(), bucket_size_mb=TINY_BUCKETS_MB, data_parallel_group=group)
    if rank == 1:
        x, y = _batch(5)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"megacore.parallel.DistributedDataParallel: the gradient all-reduce "
                                               r"of bucket 0 of \d+ \(\d parameters\) (failed or timed out|did not)"):
            _loss(ddp, x, y).backward()
        assert time.monotonic() - start < 20, "the timeout was not the group's"
    dist.barrier()  # the default group: rank 0 waits here for rank 1's timeout


def test_a_rank_that_skips_backward_makes_its_peer_time_out_instead_of_hang():
    run_distributed(_rank_0_skips_backward, 2, timeout_s=60)


def test_ddp_without_torch_distributed_says_so():
    from megacore.parallel import DistributedDataParallel

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="megacore.parallel.DistributedDataParallel: torch.distributed is not "
                                           "initialized; call torch.distributed.init_process_group"):
        DistributedDataParallel(nn.Linear(2, 2))
