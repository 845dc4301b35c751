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
    assert r.returncode == 2 and "usage: python -m megacore.benchmarks {ops,layer,model,prepare,train}" in r.stderr
