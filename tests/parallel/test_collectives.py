"""megacore.parallel collectives and tensor-parallel mappings across real gloo processes.

Every rank builds every rank's input from a seed (``_inputs``), so the expected results are plain
tensor math on the full set, compared with what the collective returns on this rank. Checks are
grouped into one spawned run per world size to keep the multi-process start-up cost low.
"""

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.parallel.utils import run_distributed


def _inputs(world_size, shape, dtype=torch.float32, seed=0):
    """Every rank's input: rank r's is drawn from seed (seed, r); small integers so sums are exact."""
    return [
        torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(1000 * seed + r)).to(dtype)
        for r in range(world_size)
    ]


def _chunk(x, dim, rank, world_size):
    return x.chunk(world_size, dim)[rank]


def _check_ops(rank, world_size):
    from megacore.parallel import collectives as C

    group = dist.group.WORLD
    # all_reduce: every reduction, by ProcessGroup and by name; odd shapes, fp32/fp64/bf16, 0-d.
    for i, (shape, dtype) in enumerate(
        [((3, 5, 7), torch.float32), ((1,), torch.float64), ((), torch.float32), ((4, 129), torch.bfloat16)]
    ):
        xs = _inputs(world_size, shape, dtype, seed=i)
        full = torch.stack(xs)
        for op, want in [("sum", full.sum(0)), ("max", full.amax(0)), ("min", full.amin(0))]:
            if dtype == torch.bfloat16 and op != "sum":
                continue
            got = C.all_reduce(xs[rank], group, op)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        got = C.all_reduce(xs[rank], group.group_name, "avg")
        torch.testing.assert_close(got.float(), (full.double().sum(0) / world_size).float(),
                                   rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    x = _inputs(world_size, (3,))[rank]
    C.all_reduce(x, group)  # out-of-place: the input is untouched
    assert torch.equal(x, _inputs(world_size, (3,))[rank])

    # all_gather / reduce_scatter along dims 0, 1, -1 of odd shapes, incl. a non-contiguous input.
    for dim in (0, 1, -1, 2):
        xs = _inputs(world_size, (3, 5, 7), seed=10 + dim)
        torch.testing.assert_close(C.all_gather(xs[rank], dim, group), torch.cat(xs, dim), rtol=0, atol=0)
        shape = [3, 5, 7]
        shape[dim] = world_size * shape[dim]
        xs = _inputs(world_size, tuple(shape), seed=20 + dim)
        want = _chunk(torch.stack(xs).sum(0), dim, rank, world_size)
        torch.testing.assert_close(C.reduce_scatter(xs[rank], dim, group), want, rtol=0, atol=0)
    xs = [t.t() for t in _inputs(world_size, (world_size * 3, 5), seed=30)]  # [5, world*3], non-contiguous
    torch.testing.assert_close(C.all_gather(xs[rank], 1, group), torch.cat(xs, 1), rtol=0, atol=0)
    want = _chunk(torch.stack(xs).sum(0), 1, rank, world_size)
    torch.testing.assert_close(C.reduce_scatter(xs[rank], 1, group), want, rtol=0, atol=0)

    # A subgroup of the first half of the ranks (size 1 with 2 ranks): the ops follow the group's size.
    members = list(range(max(1, world_size // 2)))
    sub = dist.new_group(members)
    if rank in members:
        xs = _inputs(len(members), (2, 3), seed=40)
        torch.testing.assert_close(C.all_gather(xs[rank], -1, sub), torch.cat(xs, -1), rtol=0, atol=0)
        torch.testing.assert_close(C.all_reduce(xs[rank], sub), torch.stack(xs).sum(0), rtol=0, atol=0)

    # Errors: unknown group, bad reduce_op, reduce_scatter size not divisible by the group size.
    for call, name in [(lambda: C.all_reduce(x, "no-such-group"), "all_reduce"),
                       (lambda: C.all_gather(x, 0, "no-such-group"), "all_gather"),
                       (lambda: C.reduce_scatter(x, 0, "no-such-group"), "reduce_scatter")]:
        with pytest.raises(ValueError, match=f"megacore.{name}: group_name 'no-such-group' names no registered"):
            call()
    with pytest.raises(ValueError, match="megacore.all_reduce: reduce_op 'prod' is not one of"):
        C.all_reduce(x, group, "prod")
    if world_size > 1:
        with pytest.raises(ValueError, match=f"megacore.reduce_scatter: x has size {world_size + 1} along dim 1 .*"
                                             f"not divisible by the group size {world_size}"):
            C.reduce_scatter(torch.zeros(2, world_size + 1), -1, group)
    dist.barrier()  # the error paths issued no collective: every rank is still in step

    # opcheck: schema, fake impls (shapes/strides) and torch.compile tracing agree with the real ops.
    name = group.group_name
    x = _inputs(world_size, (2 * world_size, 3))[rank]
    for op, args in [(torch.ops.megacore.all_reduce.default, (x, name, "max")),
                     (torch.ops.megacore.all_gather.default, (x, -1, name)),
                     (torch.ops.megacore.reduce_scatter.default, (x, 0, name))]:
        torch.library.opcheck(op, args)


def _check_mappings(rank, world_size, compile_too):
    from megacore.parallel import mappings as M

    group = dist.group.WORLD
    W = world_size
    # (mapping, input shape, grad shape, expected forward, expected input grad) from every rank's x, g.
    cases = [
        (M.copy_to_tensor_parallel_region, (3, 5), (3, 5),
         lambda xs, gs: xs[rank], lambda xs, gs: sum(gs)),
        (M.reduce_from_tensor_parallel_region, (3, 5), (3, 5),
         lambda xs, gs: sum(xs), lambda xs, gs: gs[rank]),
        (M.scatter_to_tensor_parallel_region, (3, W * 5), (3, 5),
         lambda xs, gs: _chunk(xs[rank], -1, rank, W), lambda xs, gs: torch.cat(gs, -1)),
        (M.gather_from_tensor_parallel_region, (2, 3, 5), (2, 3, W * 5),
         lambda xs, gs: torch.cat(xs, -1), lambda xs, gs: _chunk(gs[rank], -1, rank, W)),
        (M.scatter_to_sequence_parallel_region, (W * 3, 2, 5), (3, 2, 5),
         lambda xs, gs: _chunk(xs[rank], 0, rank, W), lambda xs, gs: torch.cat(gs, 0)),
        (M.gather_from_sequence_parallel_region, (3, 2, 5), (W * 3, 2, 5),
         lambda xs, gs: torch.cat(xs, 0), lambda xs, gs: _chunk(sum(gs), 0, rank, W)),
        (M.reduce_scatter_to_sequence_parallel_region, (W * 3, 5), (3, 5),
         lambda xs, gs: _chunk(sum(xs), 0, rank, W), lambda xs, gs: torch.cat(gs, 0)),
    ]
    for i, (fn, x_shape, g_shape, want_out, want_grad) in enumerate(cases):
        xs = _inputs(W, x_shape, seed=100 + i)
        gs = _inputs(W, g_shape, seed=200 + i)
        x = xs[rank].clone().requires_grad_()
        out = fn(x, group)
        torch.testing.assert_close(out, want_out(xs, gs), rtol=0, atol=0, msg=fn.__name__)
        out.backward(gs[rank])
        torch.testing.assert_close(x.grad, want_grad(xs, gs), rtol=0, atol=0, msg=fn.__name__)

    # opcheck the mapping ops, autograd included (each rank runs the same checks in the same order).
    x = _inputs(W, (2 * W, 3 * W), seed=400)[rank].requires_grad_()
    for op in (torch.ops.megacore.tp_copy, torch.ops.megacore.tp_reduce, torch.ops.megacore.tp_scatter,
               torch.ops.megacore.tp_gather, torch.ops.megacore.sp_scatter, torch.ops.megacore.sp_gather, torch.ops.megacore.sp_reduce_scatter):
        torch.library.opcheck(op.default, (x, group.group_name))

    if compile_too:
        # A sequence-parallel block under torch.compile(fullgraph=True): gather, compute, reduce-scatter.
        def block(t, w):
            h = M.gather_from_sequence_parallel_region(t, group)  # [W*s, h]
            return M.reduce_scatter_to_sequence_parallel_region(torch.tanh(h @ w), group)  # [s, h]

        compiled = torch.compile(block, fullgraph=True)
        xs = _inputs(W, (3, 4), seed=300)
        w = torch.randn(4, 4, generator=torch.Generator().manual_seed(7))
        results = []
        for f in (block, compiled):
            x = xs[rank].clone().requires_grad_()
            wr = w.clone().requires_grad_()
            out = f(x, wr)
            out.square().sum().backward()
            results.append((out.detach(), x.grad, wr.grad))
        for eager, comp in zip(*results):
            torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    dist.barrier()


def _all_checks(rank, world_size):
    _check_ops(rank, world_size)
    _check_mappings(rank, world_size, compile_too=world_size == 2)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_collectives_and_mappings(world_size):
    run_distributed(_all_checks, world_size, timeout_s=180)


def _rank_0_skips_the_collective(rank, world_size):
    from megacore.parallel import collectives as C

    group = dist.new_group(timeout=timedelta(seconds=3))
    if rank == 1:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="megacore.all_reduce: the collective failed or timed out"):
            C.all_reduce(torch.ones(4), group)
        assert time.monotonic() - start < 20, "the timeout was not the group's"
    dist.barrier()  # the default group: rank 0 waits here for rank 1's timeout


def test_a_skipped_collective_times_out_instead_of_hanging():
    run_distributed(_rank_0_skips_the_collective, 2, timeout_s=60)
