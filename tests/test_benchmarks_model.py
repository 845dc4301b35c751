"""`megacore bench model`: a quick T5 run end to end (megacore vs transformers on the same weights, eager), and the
step-0 check that refuses to time two models that do not compute the same function."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from megacore.cli import main

pytest.importorskip("transformers")

COLUMNS = ["model", "batch x seq", "dtype", "megacore tok/s", "HF tok/s", "megacore compile tok/s", "HF compile tok/s",
           "vs HF", "vs HF compile"]


@pytest.fixture(scope="module")
def t5_quick_run() -> tuple[str, list[dict]]:
    """One quick eager run of both T5 flavours (v1.1 unties the head) with the lengths given as options."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "model", "--models", "t5-tiny", "t5-v1_1-tiny", "--dtypes", "float32", "--quick",
                     "--no-compile", "--reps", "1", "--source-len", "16", "--target-len", "4"]) == 0
    lines = out.getvalue().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    assert [c.strip() for c in lines[header].strip("|").split("|")] == COLUMNS
    rows = [line for line in lines[header + 2:] if line.startswith("| ")]
    return out.getvalue(), [dict(zip(COLUMNS, (c.strip() for c in row.strip("|").split("|")))) for row in rows]


def test_t5_rows_time_both_libraries_over_source_plus_target_tokens(t5_quick_run):
    out, rows = t5_quick_run
    assert out.startswith("# megacore model benchmark (training step: forward + backward; T5 also AdamW) — ")
    assert "T5: batch x (source + target); its tok/s count both." in out
    assert [(r["model"], r["batch x seq"], r["dtype"]) for r in rows] == [
        ("t5-tiny", "2 x (16 + 4)", "float32"), ("t5-v1_1-tiny", "2 x (16 + 4)", "float32")]
    for row in rows:
        assert float(row["megacore tok/s"].replace(",", "")) > 0 and float(row["HF tok/s"].replace(",", "")) > 0
        assert row["vs HF"].endswith("x") and row["megacore compile tok/s"] == row["vs HF compile"] == "-"


def test_t5_refuses_to_time_transformers_with_other_weights(monkeypatch):
    from megacore.benchmarks import model as bench
    from megacore.interop import hf as interop

    to_hf = interop.to_hf

    def perturbed(model):
        hf = to_hf(model)
        with torch.no_grad():
            hf.encoder.block[0].layer[0].SelfAttention.q.weight.mul_(1.5)
        return hf

    monkeypatch.setattr(interop, "to_hf", perturbed)
    with pytest.raises(RuntimeError, match=r"t5-tiny \(float32\) differs from transformers on the same weights"):
        bench._t5_steps("t5-tiny", torch.float32, 2, 16, 4, compile_=False)
