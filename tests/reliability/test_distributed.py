"""A rank that stops, hangs or dies must not hang its peers: they raise after the collective timeout (or at
once for a dead peer) with an error naming the collective, its group and the ranks that did not arrive.

Real processes on gloo. Every test has a hard bound on its subprocesses, so a regression fails instead of
hanging; a stopped process is always killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.parallel.utils import _free_port

TIMEOUT_MINUTES = 0.05  # 3 s: the collective timeout of the direct tests


# ---- a harness: N processes initialized by megacore.parallel.init_distributed, as `megacore train` does -----------


def _worker(rank: int, world_size: int, port: int, fn, timeout_minutes: float, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from megacore import parallel

    try:
        parallel.init_distributed(timeout_minutes)
        parallel.initialize_model_parallel(world_size)
        results.put((rank, "ok", fn(rank)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    os._exit(0)  # no teardown: a group may be broken by the timeout under test


def _run(fn, world_size: int = 2, timeout_minutes: float = TIMEOUT_MINUTES, bound_s: float = 60) -> dict:
    """{rank: fn(rank)} from ``world_size`` spawned processes; fails (after killing them) on an error or when
    they are not done within ``bound_s``."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, timeout_minutes, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + bound_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    out = {}
    while not results.empty():
        rank, status, value = results.get()
        assert status == "ok", f"rank {rank} failed:\n{value}"
        out[rank] = value
    assert not hung, f"ranks {hung} still running after {bound_s} s: killed (a hang)"
    return out


def _store():
    return dist.distributed_c10d._get_default_store()


def _rank_0_done(rank: int) -> None:
    """Rank 1 (kept out of the collectives under test) waits here until rank 0 is done with them; rank 0 then
    waits for rank 1 to have seen it, since rank 0's process hosts the store."""
    if rank == 0:
        _store().set("test/rank0-done", "1")
        _store().wait(["test/rank1-saw-it"], timedelta(seconds=60))
    else:
        _store().wait(["test/rank0-done"], timedelta(seconds=60))
        _store().set("test/rank1-saw-it", "1")


# ---- the option ----------------------------------------------------------------------------------------------------


def test_the_default_timeout_is_megatrons_on_nccl_and_shorter_on_gloo():
    from megacore.parallel import default_timeout_minutes

    assert default_timeout_minutes("nccl") == 10.0 and default_timeout_minutes("gloo") == 5.0


@pytest.mark.parametrize("value, message", [
    ("0", "--distributed-timeout-minutes=0: Input should be greater than 0"),
    ("-1", "--distributed-timeout-minutes=-1: Input should be greater than 0"),
    ("inf", "--distributed-timeout-minutes=inf: Input should be a finite number"),
])
def test_a_bad_distributed_timeout_is_refused(tmp_path, capsys, value, message):
    from megacore.cli import main

    assert main(["train", "--distributed-timeout-minutes", value, "--output", str(tmp_path / "r"),
                 "--cache-dir", str(tmp_path / "c")]) == 1
    assert message in capsys.readouterr().err


# ---- the collective timeout reaches megacore's collectives; the error names the collective and the rank ----------


def _rank_1_skips_the_collectives(rank: int):
    from megacore import parallel
    from megacore.parallel.timeouts import group_timeout

    tp_group = parallel.get_tensor_parallel_group()
    timeouts = [group_timeout(g).total_seconds() for g in (None, tp_group, parallel.get_data_parallel_group())]
    if rank == 1:  # hung: in none of the collectives, nor in the diagnosis
        _rank_0_done(rank)
        return {"timeouts": timeouts}
    errors = []
    for name, collective in [("all_reduce", lambda: parallel.all_reduce(torch.ones(4), tp_group)),
                             ("barrier", lambda: dist.barrier())]:
        start = time.monotonic()
        try:
            with parallel.report_stalled_ranks("test: step 7"):
                collective()
        except parallel.StalledRanksError as e:
            errors.append({"message": str(e), "ranks": e.ranks, "collective": e.collective,
                           "minutes": e.timeout_minutes, "exited": e.exited, "seconds": time.monotonic() - start})
    _rank_0_done(rank)
    return {"timeouts": timeouts, "errors": errors}


def test_a_rank_that_skips_collectives_is_named_after_the_timeout_given_to_init_distributed():
    out = _run(_rank_1_skips_the_collectives)
    assert out[0]["timeouts"] == out[1]["timeouts"] == [3.0, 3.0, 3.0]  # every group got init_distributed's timeout
    megacore_op, torch_op = out[0]["errors"]
    assert megacore_op["message"] == ("test: step 7: all_reduce on the tensor-parallel group (ranks 0, 1) timed out "
                                      "after 0.05 min; rank 1 did not arrive (stopped, hung, or busy for longer than "
                                      "the timeout)")
    assert megacore_op["ranks"] == (1,) and megacore_op["collective"] == "all_reduce" and not megacore_op["exited"]
    assert torch_op["message"].startswith("test: step 7: torch.distributed.barrier on the default group (all 2 ranks) "
                                          "timed out after 0.05 min; rank 1 did not arrive")
    for error in (megacore_op, torch_op):  # the timeout (3 s) + the diagnosis window (2 s), not torch's 30 min
        assert error["minutes"] == pytest.approx(TIMEOUT_MINUTES)
        assert 2.5 < error["seconds"] < 3 + 2 + 10, error


# ---- a dead rank is reported at once --------------------------------------------------------------------------------


def _rank_1_dies(rank: int):
    from megacore import parallel

    if rank == 1:
        time.sleep(0.5)
        os._exit(3)
    start = time.monotonic()
    try:
        with parallel.report_stalled_ranks("test"):
            parallel.all_reduce(torch.ones(4), parallel.get_tensor_parallel_group())
    except parallel.StalledRanksError as e:
        return {"message": str(e), "exited": e.exited, "seconds": time.monotonic() - start}
    return None


def test_a_rank_that_dies_is_reported_at_once_not_after_the_timeout():
    out = _run(_rank_1_dies, timeout_minutes=1.0)
    error = out[0]
    assert error is not None and error["exited"], error
    assert error["message"].startswith("test: all_reduce on the tensor-parallel group (ranks 0, 1) failed: a rank of "
                                       "the group exited")
    assert error["seconds"] < 0.5 + 1.5, error  # its connection closed: no waiting for the 1-minute timeout


# ---- long legitimate waits: barrier() outlasts the collective timeout and names who never came ----------------------


def _rank_1_is_slow_then_absent(rank: int):
    from megacore.parallel import StalledRanksError
    from megacore.parallel.timeouts import barrier

    if rank == 1:
        time.sleep(5)  # longer than the 3 s collective timeout
    start = time.monotonic()
    barrier("test: rank 0 prepares")  # rank 1 arrives late: no error
    waited = time.monotonic() - start
    if rank == 1:
        _rank_0_done(rank)
        return None
    try:
        barrier("test: rank 0 saves", timeout_minutes=0.02)
    except StalledRanksError as e:
        return {"waited": waited, "message": str(e), "ranks": e.ranks}
    finally:
        _rank_0_done(rank)
    return None


def test_a_long_wait_outlasts_the_collective_timeout_and_a_missing_rank_is_named():
    error = _run(_rank_1_is_slow_then_absent)[0]
    assert error is not None and error["waited"] > 3.5
    assert error["message"] == ("test: rank 0 saves: rank 1 did not arrive within 0.02 min (stopped, hung, or still "
                                "busy)") and error["ranks"] == (1,)


# ---- megacore train under torchrun: kill -STOP one rank ----------------------------------------------------------------

TINY = ["--model", "gpt-tiny", "--model-overrides",
        json.dumps({"num_layers": 1, "hidden_size": 64, "num_attention_heads": 2, "ffn_hidden_size": 128}),
        "--vocab-size", "1000", "--seq-len", "32", "--micro-batch-size", "2", "--log-interval", "1",
        "--eval-interval", "100000", "--no-progress"]


def _children(pid: int) -> dict[int, int]:
    """{RANK: pid} of torchrun's worker processes."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(re.search(r"^PPid:\s*(\d+)", (entry / "status").read_text(), re.M).group(1))
            if ppid == pid:
                env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode().split("\0") if "=" in v)
                out[int(env["RANK"])] = int(entry.name)
        except (OSError, AttributeError, KeyError, ValueError):
            continue
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
@pytest.mark.parametrize("tensor_parallel_size, collective, group", [
    # the layer's own tensor-parallel collectives (overlapped with its backward) are named by the op that waited
    (2, "all_(reduce|gather)|reduce_scatter|transformer_layer_(forward|backward)", "tensor-parallel group \\(ranks 0, 1\\)"),
    (1, "the DDP gradient all-reduce \\(bucket \\d+ of \\d+\\)|all_reduce", "data-parallel group \\(ranks 0, 1\\)"),
])
def test_megacore_train_with_a_stopped_rank_fails_naming_the_collective_and_the_rank(
        corpus_cache, tmp_path, tensor_parallel_size, collective, group):
    out, log = tmp_path / "run", tmp_path / "torchrun.log"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "python"), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "megacore",
            "train", *TINY, "--train-steps", "100000", "--save-interval", "100000",
            "--tensor-parallel-size", str(tensor_parallel_size), "--distributed-timeout-minutes", "0.1",
            "--cache-dir", corpus_cache, "--output", str(out)]
    with open(log, "w") as f:
        torchrun = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, text=True)
    workers = {}
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # training has started: rank 0 logged step 2
            metrics = out / "metrics.jsonl"
            if metrics.exists() and any(json.loads(line)["step"] >= 2 for line in metrics.read_text().splitlines()):
                break
            assert torchrun.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail(f"training did not start within 40 s:\n{log.read_text()[-3000:]}")
        workers = _children(torchrun.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while _running(workers[0]) and time.monotonic() - stopped < 6 + 30:
            time.sleep(0.1)
        rank_0_exited_after = time.monotonic() - stopped
        os.kill(workers[1], signal.SIGKILL)
        torchrun.wait(60)
    finally:
        for pid in workers.values():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if torchrun.poll() is None:
            torchrun.kill()
            torchrun.wait()
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]  # one line, from rank 0 (rank 1 was stopped, then killed)
    assert re.fullmatch(rf"error: megacore train: step \d+: ({collective}) on the {group} timed out after 0.1 min; "
                        r"rank 1 did not arrive \(stopped, hung, or busy for longer than the timeout\)", errors[0]), errors
    assert "Traceback" not in text.split(errors[0])[0], text[-3000:]  # no worker traceback before it
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*\n\s*exitcode\s*: 1", text), text[-3000:]
    assert torchrun.returncode != 0
    # the 6 s timeout + the 2 s diagnosis window, give or take a step: far from gloo's 30 minutes
    assert rank_0_exited_after < 6 + 2 + 15, rank_0_exited_after
    print(f"rank 0 exited {rank_0_exited_after:.1f} s after rank 1 was stopped")


@pytest.mark.slow
def test_megacore_train_waits_for_the_corpus_and_checkpoints_longer_than_a_short_collective_timeout(tmp_path):
    """Rank 0 prepares the embedded corpus into a fresh cache (5-20 s on 2 cores) and writes checkpoints while
    rank 1 waits: those waits are not bound by a 3 s collective timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "python"), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "megacore",
            "train", *TINY, "--train-steps", "2", "--save-interval", "1", "--eval-batches", "2",
            "--tensor-parallel-size", "2", "--distributed-timeout-minutes", "0.05",
            "--cache-dir", str(tmp_path / "fresh-cache"), "--output", str(tmp_path / "run")]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "preparing the embedded corpus" in r.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_00000001",
                                                                                      "step_00000002"]
