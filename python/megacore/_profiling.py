"""Named phases of the training loop for the profilers, in one place (docs/profiling.md).

``phase("megacore.forward")`` marks a block: an NVTX range (Nsight Systems) when torch has CUDA, and a
torch.profiler ``record_function`` scope while torch.profiler records. With neither it costs a flag check.
The C++ transformer layer marks its own phases the same way (cpp/common/profiling.h).

``MEGACORE_PROFILE_STEPS=N-M`` (1-based ``Trainer.train_step`` numbers, inclusive; ``N`` alone for one
step) calls ``torch.cuda.profiler.start()`` before step N and ``stop()`` after step M, so
``nsys profile --capture-range=cudaProfilerApi`` records those steps only.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

PROFILE_STEPS_ENV = "MEGACORE_PROFILE_STEPS"

_nvtx: Optional[bool] = None  # whether torch.cuda.nvtx works (a CUDA build of torch); found on first use


def _nvtx_works() -> bool:
    global _nvtx
    if _nvtx is None:
        try:
            torch.cuda.nvtx.range_push("megacore")
            torch.cuda.nvtx.range_pop()
            _nvtx = True
        except (RuntimeError, AttributeError):  # a CPU build: "NVTX functions not installed"
            _nvtx = False
    return _nvtx


class phase:
    """``with phase(name):`` marks the block as ``name`` for Nsight (NVTX) and torch.profiler.
    Nests; exceptions pass through."""

    __slots__ = ("name", "_record", "_pushed")

    def __init__(self, name: str):
        self.name = name
        self._record = None
        self._pushed = False

    def __enter__(self) -> "phase":
        if _nvtx_works():
            torch.cuda.nvtx.range_push(self.name)
            self._pushed = True
        if torch.autograd._profiler_enabled():  # record_function costs an op call: only while recording
            self._record = torch.profiler.record_function(self.name)
            self._record.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        if self._record is not None:
            self._record.__exit__(*exc)
            self._record = None
        if self._pushed:
            torch.cuda.nvtx.range_pop()
            self._pushed = False
        return False


class ProfileWindow:
    """Starts the CUDA profiler before step ``first`` and stops it after step ``last`` (1-based, inclusive),
    for ``nsys profile --capture-range=cudaProfilerApi``. Does nothing without CUDA.

    ``ProfileWindow.from_env()`` reads ``MEGACORE_PROFILE_STEPS`` ("N-M" or "N"; unset or empty: no window).
    Raises ValueError for a malformed value."""

    def __init__(self, first: int, last: int):
        if not (isinstance(first, int) and isinstance(last, int) and 1 <= first <= last):
            raise ValueError(f"megacore.ProfileWindow: steps {first!r}-{last!r} must be ints with 1 <= first <= last")
        self.first, self.last = first, last
        self.active = False

    @classmethod
    def from_env(cls) -> Optional["ProfileWindow"]:
        spec = os.environ.get(PROFILE_STEPS_ENV, "").strip()
        if not spec:
            return None
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", spec)
        if m is None or not 1 <= int(m[1]) <= int(m[2] or m[1]):
            raise ValueError(f"megacore: {PROFILE_STEPS_ENV}={spec!r}, expected 'N-M' or 'N' "
                             "(1-based training steps, N <= M), e.g. 10-12")
        return cls(int(m[1]), int(m[2] or m[1]))

    def before_step(self, step: int) -> None:
        if step == self.first and torch.cuda.is_available():
            torch.cuda.synchronize()  # the capture starts with no earlier work in flight
            torch.cuda.profiler.start()
            self.active = True

    def after_step(self, step: int) -> None:
        if step == self.last and self.active:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            self.active = False


__all__ = ["PROFILE_STEPS_ENV", "ProfileWindow", "phase"]
