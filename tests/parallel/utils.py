"""Run a test body in N real processes on the gloo backend, with a timeout, so a distributed bug fails
the test with the worker's traceback instead of hanging it."""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, errors, timeout_s: float):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    ok = False
    try:
        import torch

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        fn(rank, world_size, *args)
        ok = True
        errors.put((rank, None))  # done: waiting for the others at the teardown barrier is not this rank's hang
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        from megacore.parallel import state

        # pending collectives waited for (e.g. the distributed optimizer's last all-gathers), then the ranks meet
        # before tearing down: a rank that closes its connections while a peer still talks to it aborts the peer
        state.shutdown_distributed(barrier=ok)


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float = 120.0, collective_timeout_s: float = 30.0):
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes with an initialized gloo
    default group (collectives time out after ``collective_timeout_s``). Raises AssertionError with the
    first failing rank's traceback; kills every worker if the whole run exceeds ``timeout_s``.
    ``fn`` must be a module-level function (it is pickled)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors, collective_timeout_s), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    import time

    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    done, failures = set(), []
    while not errors.empty():
        rank, tb = errors.get()
        (done.add(rank) if tb is None else failures.append((rank, tb)))
    if failures:
        rank, tb = failures[0]
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{tb}")
    hung = [r for r in alive if r not in done]  # ranks done with fn only wait for these at the teardown barrier
    if alive:
        raise AssertionError(f"ranks {hung or alive} of {world_size} still running after {timeout_s:.0f} s: killed "
                             f"({'a hang' if hung else 'a hang while tearing down'})")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"workers exited with non-zero codes: {bad}"


def gather_shards(t, group, world: int) -> list:
    """Every rank's ``t`` (same shape on every rank), in rank order."""
    out = [t.new_empty(t.shape) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def shard_dims(model, world: int) -> dict:
    """name -> the dim each parameter of ``model`` is sharded along over ``world`` ranks (None: replicated), as
    the parallel plan reads the modules' declarations."""
    from megacore.parallel.sharding import param_shards

    return {shard.name: shard.dim for shard in param_shards(model, world)}
