"""Bounded waits for torch.distributed runs, and errors that say which collective stalled and which ranks.

A rank that stops (``kill -STOP``), hangs or crashes must not leave its peers waiting silently:

- ``init_distributed(timeout_minutes)`` initializes torch.distributed with a collective timeout
  (``default_timeout_minutes``: 10 min on NCCL like Megatron, 5 on gloo). ``initialize_model_parallel``
  gives its groups the same timeout, and megacore's C++ collectives and the DDP reducer wait at most their
  group's timeout, so every collective of a run raises after it instead of hanging.
- ``report_stalled_ranks(where)`` turns such a timeout, raised anywhere inside it (megacore's collectives,
  the DDP reducer, torch.distributed), into a ``StalledRanksError`` naming the collective, its group and
  the ranks that did not arrive. A peer that exited is reported at once (its connection closed).
- ``barrier(what)`` is for waits that may legitimately outlast the collective timeout (rank 0 preparing a
  corpus or writing a checkpoint while the others wait): it has its own, long bound.

Both the diagnosis and the barrier meet in torch.distributed's rendezvous store (a TCPStore, held by
torchrun's agent) rather than in a process group, because a group is unusable after one of its
collectives timed out (gloo closes its connections), and the store needs no backend support (NCCL too).
On NCCL the watchdog may end a process at the timeout before Python sees an exception; its log names the
collective.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
import traceback
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist

_NAME = "megacore.parallel"


class StalledRanksError(RuntimeError):
    """A collective could not complete because ranks stopped, hung, were busy for longer than the timeout,
    or exited.

    Attributes: ``where`` (the caller's label, e.g. "megacore train: step 7"), ``collective`` (e.g.
    "all_reduce", "the DDP gradient all-reduce (bucket 0 of 2)", "torch.distributed.barrier"), ``group`` (e.g.
    "the tensor-parallel group (ranks 0, 1)"), ``ranks`` (global ranks that did not arrive; empty when not
    known), ``timeout_minutes`` (the wait that expired; None when a peer exited) and ``exited`` (a peer
    closed its connection: it crashed or was killed).
    """

    def __init__(self, message: str, *, where: str = "", collective: str = "", group: str = "",
                 ranks: tuple[int, ...] = (), timeout_minutes: Optional[float] = None, exited: bool = False):
        super().__init__(message)
        self.where, self.collective, self.group = where, collective, group
        self.ranks, self.timeout_minutes, self.exited = tuple(ranks), timeout_minutes, exited


def default_timeout_minutes(backend: str) -> float:
    """The collective timeout when none is given: 10 min on NCCL (Megatron's ``--distributed-timeout-minutes``
    default); 5 min on gloo and other CPU backends, whose runs here are single-machine and where no
    collective legitimately waits that long (long waits go through ``barrier``), so a stalled rank
    surfaces sooner. torch's own defaults are 10 min (NCCL) and 30 min (gloo)."""
    return 10.0 if str(backend).lower() == "nccl" else 5.0


def init_distributed(timeout_minutes: Optional[float] = None) -> None:
    """Initializes torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL
    when CUDA is available (the device set from LOCAL_RANK), else gloo; collectives time out after
    ``timeout_minutes`` (None: ``default_timeout_minutes(backend)``). Groups made afterwards by
    ``initialize_model_parallel`` get the same timeout. Does nothing when torch.distributed is already
    initialized. Raises ValueError when ``timeout_minutes`` is not a number > 0."""
    number = isinstance(timeout_minutes, (int, float)) and not isinstance(timeout_minutes, bool)
    if timeout_minutes is not None and not (number and timeout_minutes > 0):
        raise ValueError(f"{_NAME}.init_distributed: timeout_minutes={timeout_minutes!r} must be a number > 0 "
                         "(or None for the backend's default)")
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    minutes = default_timeout_minutes(backend) if timeout_minutes is None else float(timeout_minutes)
    dist.init_process_group(backend, timeout=timedelta(minutes=minutes))


def group_timeout(group: Optional[dist.ProcessGroup] = None) -> Optional[timedelta]:
    """The collective timeout of ``group`` (None: the default group), as its backend holds it (the
    ``timeout=`` it was created with); None when the backend does not expose it."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    for device in getattr(pg, "_device_types", None) or [torch.device("cpu")]:
        try:
            timeout = pg._get_backend(device).options._timeout
        except (AttributeError, RuntimeError):
            continue
        if isinstance(timeout, timedelta) and timeout.total_seconds() > 0:
            return timeout
    return None


def long_wait_minutes() -> float:
    """The bound of ``barrier`` when none is given: 30 minutes, or the collective timeout if that is longer."""
    timeout = group_timeout() if dist.is_initialized() else None
    return max(30.0, timeout.total_seconds() / 60 if timeout else 0.0)


def barrier(what: str, timeout_minutes: Optional[float] = None) -> None:
    """Waits until every rank has called ``barrier`` (the same number of times), for at most ``timeout_minutes``
    (None: ``long_wait_minutes()``), independently of the collective timeout: for waits that may be long
    (rank 0 prepares a corpus or writes a checkpoint while the others wait). Meets in the rendezvous store,
    not in a process group. A no-op without torch.distributed or with one rank.

    Raises StalledRanksError naming ``what`` and the ranks that did not arrive in time.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    minutes = long_wait_minutes() if timeout_minutes is None else float(timeout_minutes)
    missing = _rendezvous("barrier", minutes * 60)
    if missing:
        raise StalledRanksError(f"{what}: {_ranks_text(missing)} not arrive within {minutes:.3g} min "
                                "(stopped, hung, or still busy)", where=what, collective="barrier",
                                group=_default_group_text(), ranks=tuple(missing), timeout_minutes=minutes)


@contextlib.contextmanager
def report_stalled_ranks(where: str) -> Iterator[None]:
    """Turns a collective that timed out or lost a peer, inside the block, into a ``StalledRanksError``:
    ``"{where}: all_reduce on the tensor-parallel group (ranks 0, 1) timed out after 0.1 min; rank 1 did
    not arrive (stopped, hung, or busy for longer than the timeout)"``.

    Recognized: megacore's C++ collectives and the DDP reducer (their messages name the op and the group),
    and torch.distributed's collectives (named from the traceback). After a timeout this rank checks in at
    the rendezvous store and waits a short window (a quarter of the timeout, 2 to 30 s) for the other ranks,
    which check in when their own collectives time out; those that do not are the ones reported. A peer
    that exited is reported at once, without the window. Other exceptions pass through unchanged.
    """
    try:
        yield
    except StalledRanksError:
        raise
    except RuntimeError as e:
        stall = _stall_of(e) if dist.is_available() and dist.is_initialized() else None
        if stall is None:
            raise
        raise _diagnose(where, *stall) from e


# ---- recognizing a stalled collective -------------------------------------------------------------------------

# megacore's C++ waits (cpp/parallel/group.cpp): "megacore.<op>: <what> failed or timed out (group 'NAME' DESC,
# timeout N ms; ...): <backend's message>" or "... did not finish within the group timeout (group 'NAME' DESC,
# timeout N ms); ...".
_MEGACORE_WAIT = re.compile(r"megacore\.([\w.]+): (.+?) (?:failed or timed out|did not finish within the group "
                            r"timeout) \(group '([^']*)'[^;)]*, timeout (\d+) ms")
_BUCKET = re.compile(r"the (gradient|parameter) (all-reduce|reduce-scatter|all-gather) of (bucket \d+ of \d+)")
# Who issues bucketed collectives, as the report names them.
_BUCKETED = {"parallel.DistributedDataParallel": "the DDP",
             "training.DistributedOptimizer": "the distributed optimizer's"}
# A peer process that is gone, in gloo's words (its tcp pair) and NCCL's ("remote process exited or there was a
# network error").
_EXITED = re.compile(r"connection closed by peer|connection reset by peer|broken pipe|remote process exited",
                     re.IGNORECASE)
_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)


def _stall_of(e: BaseException) -> Optional[tuple[str, str, Optional[float], bool]]:
    """(collective, group text, timeout in minutes or None, exited) when ``e`` is a distributed collective
    that timed out or lost a peer; None for any other error."""
    message = str(e)
    exited = bool(_EXITED.search(message))
    if not exited and not _TIMED_OUT.search(message):
        return None
    m = _MEGACORE_WAIT.search(message)
    if m:
        op, what, group_name, ms = m.groups()
        bucket = _BUCKET.search(what)
        if op in _BUCKETED:
            collective = (f"{_BUCKETED[op]} {bucket.group(1)} {bucket.group(2)} ({bucket.group(3)})" if bucket
                          else f"{_BUCKETED[op]} bucket collective")
        else:
            collective = op
        return collective, _group_text(group_name), int(ms) / 60000, exited
    frame = _torch_distributed_frame(e)
    if frame is None:
        return None
    group = frame.f_locals.get("group")
    pg = group if isinstance(group, dist.ProcessGroup) else None
    timeout = group_timeout(pg)
    text = _group_text(pg.group_name) if pg is not None else _default_group_text()
    return f"torch.distributed.{frame.f_code.co_name}", text, timeout.total_seconds() / 60 if timeout else None, exited


def _torch_distributed_frame(e: BaseException):
    """The outermost frame of a public torch.distributed collective in ``e``'s traceback, or None."""
    for frame, _ in traceback.walk_tb(e.__traceback__):
        code = frame.f_code
        if os.path.basename(code.co_filename) == "distributed_c10d.py" and not code.co_name.startswith("_"):
            return frame
    return None


def _group_text(group_name: str) -> str:
    """"the tensor-parallel group (ranks 0, 1)" for a group name megacore's parallel state knows."""
    from megacore.parallel import state

    if state.model_parallel_is_initialized():
        s = state.get_parallel_state()
        for role in ("tensor", "data", "pipeline"):
            if getattr(s, f"{role}_parallel_group_name") == group_name:
                ranks = ", ".join(map(str, getattr(s, f"{role}_parallel_ranks")))
                return f"the {role}-parallel group (ranks {ranks})"
    if group_name == dist.distributed_c10d._get_default_group().group_name:
        return _default_group_text()
    return f"process group '{group_name}'"


def _default_group_text() -> str:
    return f"the default group (all {dist.get_world_size()} ranks)"


def _ranks_text(ranks: list[int]) -> str:
    """"rank 1 did" / "ranks 1, 3 did"."""
    return f"rank {ranks[0]} did" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} did"


def _diagnose(where: str, collective: str, group: str, minutes: Optional[float], exited: bool) -> StalledRanksError:
    fields = dict(where=where, collective=collective, group=group, timeout_minutes=minutes, exited=exited)
    if exited:  # no waiting: the peer is gone, and torchrun names the rank that exited
        return StalledRanksError(f"{where}: {collective} on {group} failed: a rank of the group exited (its "
                                 "connection closed); see which one in torchrun's report", **fields)
    after = f" after {minutes:.3g} min" if minutes is not None else ""
    window_s = min(30.0, max(2.0, 0.25 * minutes * 60)) if minutes is not None else 10.0
    try:
        missing = _rendezvous("stalled", window_s)
    except RuntimeError as e:  # the store itself did not answer (its host is the stopped rank?)
        return StalledRanksError(f"{where}: {collective} on {group} timed out{after}; which ranks did not arrive "
                                 f"is unknown (the rendezvous store did not answer: {e})", **fields)
    if not missing:
        return StalledRanksError(f"{where}: {collective} on {group} timed out{after}, yet every rank checked in "
                                 "afterwards (were they in different collectives, or was one busy for longer "
                                 "than the timeout?)", **fields)
    return StalledRanksError(f"{where}: {collective} on {group} timed out{after}; {_ranks_text(missing)} not arrive "
                             "(stopped, hung, or busy for longer than the timeout)", ranks=tuple(missing), **fields)


# ---- the rendezvous store --------------------------------------------------------------------------------------

_rendezvous_counters: dict[str, "itertools.count[int]"] = {}


def _rendezvous(kind: str, seconds: float) -> list[int]:
    """Checks this rank in at the next ``kind`` rendezvous in torch.distributed's store and waits at most
    ``seconds`` for every rank; returns the ranks that had not checked in ([] when all did). Every rank
    numbers its rendezvous of a kind in call order, so the n-th calls meet."""
    n = next(_rendezvous_counters.setdefault(kind, itertools.count()))
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    key = f"megacore/{kind}/{n}"
    store.set(f"{key}/rank{rank}", "1")
    if store.add(f"{key}/count", 1) >= world:
        store.set(f"{key}/done", "1")
    # Polled rather than store.wait(timeout): running out of time is the expected end of a diagnosis, and a
    # timed-out store.wait logs socket warnings.
    start = time.monotonic()
    while not store.check([f"{key}/done"]):
        elapsed = time.monotonic() - start
        if elapsed >= seconds:
            return [r for r in range(world) if not store.check([f"{key}/rank{r}"])]
        time.sleep(min(1.0, 0.05 + elapsed / 10, seconds - elapsed))
    return []


__all__ = ["StalledRanksError", "barrier", "default_timeout_minutes", "group_timeout", "init_distributed",
           "long_wait_minutes", "report_stalled_ranks"]
