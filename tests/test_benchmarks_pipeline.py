"""`megacore bench pipeline`: its --quick run end to end at PP 1 and 2 (and DP 2 with the distributed optimizer
where this build has it), and what it measures with, checked against known answers."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from megacore.benchmarks.pipeline import (Layout, SavedTensorMeter, distributed_optimizer_class,
                                          optimizer_state_bytes)
from megacore.cli import main

HAS_DISTOPT = distributed_optimizer_class() is not None
LAYOUTS = ["pp1", "pp2"] + (["pp1dp2+distopt"] if HAS_DISTOPT else [])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One --quick run for every test here: (stdout, the JSON results by layout)."""
    path = tmp_path_factory.mktemp("bench") / "pipeline.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "pipeline", "--quick", "--layouts", *LAYOUTS, "--json", str(path)]) == 0
    results = json.loads(path.read_text())
    return out.getvalue(), {row["layout"]: row for row in results["rows"]}


def test_quick_run_prints_a_header_and_one_row_per_layout(quick_run):
    out, rows = quick_run
    lines = out.splitlines()
    assert lines[0].startswith("# megacore pipeline-parallel benchmark") and "cores" in lines[0]
    header = next(i for i, line in enumerate(lines) if line.startswith("| layout |"))
    table = [line for line in lines[header + 2:] if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table] == LAYOUTS
    assert all(row.count("|") == 12 for row in table), table
    assert set(rows) == set(LAYOUTS)
    assert rows["pp2"]["processes"] == 2 and rows["pp2"]["microbatches_per_pipeline"] == 4


def test_measured_bubble_is_a_fraction_next_to_the_schedules(quick_run):
    _, rows = quick_run
    assert rows["pp1"]["bubble_measured"] == 0 and rows["pp1"]["bubble_theory"] == 0
    pp2 = rows["pp2"]
    assert 0 <= pp2["bubble_measured"] < 1 and all(0 <= b < 1 for b in pp2["bubble_measured_per_rank"])
    assert pp2["bubble_theory"] == pytest.approx(1 / 5)  # (P - 1) / (m + P - 1), m = 4
    assert all(r["total_s"] > 0 and r["wait_s"] >= 0 for r in pp2["rounds"][0])
    exits = {name: [(r["exit_code"], r.get("teardown_error")) for r in row["rounds"][0]] for name, row in rows.items()}
    assert all(code == 0 for row in exits.values() for code, _ in row), exits
    assert all(row["step_ms"] > 0 and row["cpu_ms"] > 0 for row in rows.values())


def test_each_pp2_stage_holds_less_activation_memory_than_pp1(quick_run):
    _, rows = quick_run
    (whole,) = rows["pp1"]["activation_peak_bytes"]
    stages = rows["pp2"]["activation_peak_bytes"]
    assert whole > 0 and len(stages) == 2
    assert all(0 < s < whole for s in stages), (stages, whole)


def test_every_layout_trains_the_same_model(quick_run):
    _, rows = quick_run
    losses = [row["final_loss"] for row in rows.values()]
    assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-2)  # bf16 with fp32 masters


@pytest.mark.skipif(not HAS_DISTOPT, reason="megacore.training.distributed_optimizer is not in this build")
def test_distributed_optimizer_holds_about_half_the_optimizer_state_at_dp2(quick_run):
    _, rows = quick_run
    (full,) = rows["pp1"]["optimizer_bytes"]
    shards = rows["pp1dp2+distopt"]["optimizer_bytes"]
    assert len(shards) == 2
    # 1/2 of masters + moments each, plus bucket padding
    assert all(0.45 * full <= s <= 0.6 * full for s in shards), (shards, full)
    assert sum(shards) == pytest.approx(full, rel=0.1)


def test_layout_names_parse_and_bad_ones_are_refused():
    assert Layout.parse("pp2v2") == Layout(2, 2)
    assert Layout.parse("pp2dp2+distopt") == Layout(2, 1, 2, True)
    assert Layout.parse("pp4").name == "pp4" and Layout.parse("pp2dp2+distopt").processes == 4
    with pytest.raises(ValueError, match="expected pp<P>"):
        Layout.parse("tp2")
    with pytest.raises(ValueError, match="give dp<D> with D > 1"):
        Layout.parse("pp2+distopt")
    with pytest.raises(ValueError, match="need more than one pipeline stage"):
        Layout.parse("pp1v2")


def test_saved_tensor_meter_counts_each_saved_storage_once_until_backward_frees_it():
    weight = torch.nn.Parameter(torch.randn(256))
    x = torch.randn(256, requires_grad=True)
    meter = SavedTensorMeter(exclude=[weight])
    with meter:
        y = x.exp()  # saves its output y: 1 KiB
        z = (y.sin() * weight).sum()  # sin saves y again (same storage); mul saves sin(y) and the excluded weight
        assert meter.current == 2 * 256 * 4
        z.backward()
    assert meter.peak == 2 * 256 * 4 and meter.current == 0 and not meter.live


def test_optimizer_state_counts_masters_apart_from_the_model_and_both_moments():
    from megacore.training import MixedPrecision, build_optimizer

    def after_one_step(dtype):
        model = torch.nn.Linear(8, 4)
        precision = MixedPrecision(model, dtype)
        optimizer = build_optimizer(precision, lr=1e-3)
        model(torch.randn(2, 8, dtype=dtype)).float().sum().backward()
        precision.copy_grads_to_master()
        optimizer.step()
        return optimizer_state_bytes(optimizer, model.parameters())

    n = 8 * 4 + 4
    assert after_one_step(torch.float32) == {"masters": 0, "exp_avg": 4 * n, "exp_avg_sq": 4 * n, "total": 8 * n}
    assert after_one_step(torch.bfloat16) == {"masters": 4 * n, "exp_avg": 4 * n, "exp_avg_sq": 4 * n,
                                              "total": 12 * n}
