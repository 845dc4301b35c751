"""The `megacore` command: info, and the op benchmark's harness end to end at small sizes."""

from __future__ import annotations

import json
import subprocess
import sys

import megacore
from megacore.cli import main


def test_info_prints_build_info_as_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu_isas"] == megacore.build_info()["cpu_isas"]


def test_bench_ops_prints_a_row_per_op_dtype_and_pass(capsys):
    argv = ["bench", "ops", "--quick", "--ops", "bias_gelu", "layer_norm", "--dtypes", "float32", "--reps", "1"]
    assert main(argv + ["--no-compile"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| bias_gelu") or line.startswith("| layer_norm")]
    assert len(rows) == 4, out
    assert all(row.count("|") == 13 for row in rows)
    assert "clone (allocates its output)" in out


def test_bench_layer_prints_a_row_per_size_dtype_and_dropout(capsys):
    argv = ["bench", "layer", "--quick", "--hidden", "256", "--dtypes", "float32", "bfloat16", "--reps", "1",
            "--no-compile"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 256 |")]
    assert len(rows) == 4, out  # 2 dtypes x attention dropout 0.1 and 0
    assert all(row.count("|") == 12 and "x |" in row for row in rows)


def test_bench_rejects_an_unknown_op():
    r = subprocess.run(
        [sys.executable, "-m", "megacore", "bench", "ops", "--ops", "nope"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "unknown op(s) ['nope']" in r.stderr


def test_python_dash_m_megacore_benchmarks_needs_a_name():
    r = subprocess.run([sys.executable, "-m", "megacore.benchmarks"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: python -m megacore.benchmarks {ops,layer,model,prepare,train,pipeline,generate}" in r.stderr


def test_bench_train_runs_a_preset_with_overrides_and_without_hf(capsys):
    argv = ["bench", "train", "--quick", "--no-compile", "--no-hf", "--dtypes", "float32", "--reps", "1",
            "--device", "cpu", "--model", "gpt-tiny", "--override", "num_layers=1", "vocab_size=512"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gpt-tiny {'num_layers': 1, 'vocab_size': 512}" in out
    rows = [line for line in out.splitlines() if line.startswith("| float32 | 2 x 64 |")]
    assert len(rows) == 1 and rows[0].count("|") == 10 and "(measured GEMM)" in rows[0], out


def test_bench_train_profile_steps_runs_the_steps_and_prints_no_table(capsys):
    argv = ["bench", "train", "--device", "cpu", "--model", "gpt-tiny", "--override", "num_layers=1",
            "--batch", "1", "--seq", "16", "--dtypes", "float32", "--profile-steps", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "profiled 2 steps of gpt-tiny" in out and "| float32" not in out


def test_bench_train_mfu_uses_the_datasheet_bf16_peak_of_a_known_gpu(monkeypatch):
    import torch

    from megacore.benchmarks.train import datasheet_peak

    for name, tflops in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
                         ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L4", None)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert datasheet_peak("cuda", torch.bfloat16) == (tflops and tflops * 1e12), name
    assert datasheet_peak("cuda", torch.float32) is None
    assert datasheet_peak("cpu", torch.bfloat16) is None
