"""`megacore bench generate`: its --quick run end to end (gpt-tiny, megacore vs transformers on the same weights),
the JSON it writes, and a compiler failure reported as n/a instead of a crash."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from megacore.cli import main

pytest.importorskip("transformers")

COLUMNS = ["batch", "mode", "megacore prefill tok/s", "HF prefill tok/s", "prefill megacore/HF",
           "megacore decode tok/s", "HF decode tok/s", "decode megacore/HF", "tokens"]


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _table(out: str) -> list[dict]:
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| batch |"))
    assert [c.strip() for c in lines[header].strip("|").split("|")] == COLUMNS
    rows = [line for line in lines[header + 2:] if line.startswith("| ")]
    return [dict(zip(COLUMNS, (c.strip() for c in row.strip("|").split("|")))) for row in rows]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run for the tests below: (stdout, the JSON). One thread: on a busy 2-core machine a 2-thread
    OpenMP team waiting for a descheduled thread made the run 3x slower (the harness is tested, not the speed)."""
    path = tmp_path_factory.mktemp("bench") / "generate.json"
    out = _run(["bench", "generate", "--quick", "--threads", "1", "--json", str(path)])
    return out, json.loads(path.read_text())


def test_quick_run_prints_a_header_naming_the_machine_and_one_eager_row_per_batch_size(quick_run):
    out, _ = quick_run
    first = out.splitlines()[0]
    assert first.startswith("# megacore generation benchmark (greedy, KV cache) — gpt-tiny, float32, prompt 16, "
                            "8 new tokens")
    assert "cores" in first and "torch " in first and "transformers " in first
    table = _table(out)
    assert [(r["batch"], r["mode"]) for r in table] == [("1", "eager"), ("2", "eager")]  # --quick: no compile
    for row in table:
        for column in COLUMNS[2:8]:
            assert not row[column].startswith("n/a"), row
        assert row["prefill megacore/HF"].endswith("x") and row["decode megacore/HF"].endswith("x")


def test_both_libraries_produce_identical_tokens(quick_run):
    out, results = quick_run
    assert all(r["tokens"] == "identical" for r in _table(out))
    assert all(row["tokens_match"] is True and row["megacore"]["mismatch"] is None for row in results["rows"])
    assert "WARNING" not in out


def test_throughputs_are_positive_and_consistent_with_the_times(quick_run):
    _, results = quick_run
    for row in results["rows"]:
        b = row["batch"]
        for side in ("megacore", "transformers"):
            r = row[side]
            assert r["error"] is None and r["prefill_s"] > 0 and r["decode_s"] > 0
            assert r["total_s"] >= r["prefill_s"] + r["decode_s"]
            assert r["prefill_tok_s"] == pytest.approx(b * 16 / r["prefill_s"])
            assert r["decode_tok_s"] == pytest.approx(b * 7 / r["decode_s"])  # the tokens after the first
        assert row["prefill_ratio"] == pytest.approx(row["megacore"]["prefill_tok_s"]
                                                     / row["transformers"]["prefill_tok_s"])
        assert row["decode_ratio"] == pytest.approx(row["megacore"]["decode_tok_s"]
                                                    / row["transformers"]["decode_tok_s"])


def test_json_records_the_machine_and_settings(quick_run):
    _, results = quick_run
    assert results["benchmark"] == "generate" and results["cores"] >= 1 and results["threads"] == 1
    assert results["torch"] and results["transformers"] and "threads" in results["machine"]
    assert results["settings"] == {"model": "gpt-tiny", "dtype": "float32", "batch_sizes": [1, 2], "prompt_len": 16,
                                   "new_tokens": 8, "repeats": 1, "compile": False, "compile_timeout": 900.0}
    assert [(row["batch"], row["mode"]) for row in results["rows"]] == [(1, "eager"), (2, "eager")]


def test_a_compiler_that_fails_gives_n_a_rows_with_the_reason(monkeypatch, tmp_path):
    from megacore.benchmarks import generate as bench

    def broken_compile(fn):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(bench, "_compile", broken_compile)
    path = tmp_path / "generate.json"
    out = _run(["bench", "generate", "--quick", "--compile", "--batch-sizes", "1", "--prompt-len", "4",
                "--new-tokens", "2", "--threads", "1", "--json", str(path)])
    eager, compiled = _table(out)
    assert compiled["mode"] == "compile" and not eager["megacore prefill tok/s"].startswith("n/a")
    for column in ("megacore prefill tok/s", "HF prefill tok/s", "megacore decode tok/s", "HF decode tok/s"):
        assert compiled[column] == "n/a (RuntimeError: no C++ compiler here)"
    assert compiled["prefill megacore/HF"] == "-" and compiled["tokens"] == "-"
    row = json.loads(path.read_text())["rows"][1]
    assert row["megacore"]["error"] == row["transformers"]["error"] == "RuntimeError: no C++ compiler here"
    assert row["prefill_ratio"] is None and row["tokens_match"] is None


def test_bad_sizes_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "generate", "--quick", "--new-tokens", "1"])
    assert "--new-tokens >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "generate", "--quick", "--prompt-len", "1000", "--new-tokens", "100"])
    assert "exceeds gpt-tiny's 1024 positions" in capsys.readouterr().err


def test_a_token_mismatch_is_shown_in_the_row_not_hidden():
    import torch

    from megacore.benchmarks.generate import _mismatch, format_row

    reference = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert _mismatch(reference.clone(), reference) is None
    assert _mismatch(torch.tensor([[1, 2, 3, 4], [5, 6, 9, 9]]), reference) == "1/2 sequences differ, first at new token 3"
    side = dict(error=None, prefill_tok_s=100.0, decode_tok_s=10.0)
    row = dict(batch=2, mode="eager", prefill_ratio=1.0, decode_ratio=1.0, tokens_match=False,
               megacore=dict(side, tokens_match=False, mismatch="1/2 sequences differ, first at new token 3"),
               transformers=dict(side, tokens_match=None, mismatch=None))
    assert format_row(row).endswith("| MISMATCH: megacore 1/2 sequences differ, first at new token 3 |")
