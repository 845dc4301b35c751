"""What a ``megacore train`` run writes about itself on rank 0: ``metrics.jsonl`` (one JSON object per logged
step and per evaluation), TensorBoard events when tensorboard is installed, ``loss.png`` when matplotlib is,
and the progress bar."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

from megacore._files import atomic_write_text

_FN = "megacore train"


@contextlib.contextmanager
def naming(path: Path):
    """Re-raises an OSError while writing ``path`` with the path and the command in its message."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{_FN}: cannot write {path}: {(e.strerror or str(e)).lower()}") from None


def _open_metrics(path: Path, keep_through_step: Optional[int]):
    """metrics.jsonl opened for appending, never through a symbolic link; on a resume the records of steps
    after the checkpoint (logged by the interrupted run, about to be logged again) are dropped first."""
    if path.is_symlink():
        raise ValueError(f"{_FN}: {path} is a symbolic link; refusing to write the metrics through it")
    if keep_through_step is not None and path.exists():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and record.get("step", 0) <= keep_through_step:
                kept.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in kept))
    return open(path, "a", encoding="utf-8", opener=lambda p, flags: os.open(p, flags | os.O_NOFOLLOW, 0o666))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


class MetricsLog:
    """``out/metrics.jsonl`` and ``out/tensorboard`` of a run; every method does nothing when not ``enabled``
    (ranks other than 0).

    ``keep_through_step``: on a resume, the checkpoint's step (records of later steps are dropped, they are
    about to be logged again); None for a new run. Raises ValueError when metrics.jsonl is a symbolic link.
    """

    def __init__(self, out: Path, keep_through_step: Optional[int], enabled: bool):
        self.file = _open_metrics(out / "metrics.jsonl", keep_through_step) if enabled else None
        self.tensorboard = _tensorboard(out) if enabled else None

    def write(self, record: dict) -> None:
        """Appends ``record`` (a dict with ``step``) to metrics.jsonl and its numbers to TensorBoard."""
        if self.file is not None:
            with naming(Path(self.file.name)):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
        if self.tensorboard is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def progress_bar(total_steps: int, step: int, enabled: bool):
    """A tqdm bar from ``step`` to ``total_steps``, or None when not ``enabled``."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_steps, initial=step, desc="megacore train", unit="step", dynamic_ncols=True)


def plot_loss(out: Path, history: list) -> None:
    """``out/loss.png``, the training loss of ``history`` (records with ``step`` and ``loss``), when matplotlib
    (an optional extra) is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not history:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("megacore train")
    fig.tight_layout()
    tmp = out / ".loss.png.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out / "loss.png")


__all__ = ["MetricsLog", "naming", "plot_loss", "progress_bar"]
