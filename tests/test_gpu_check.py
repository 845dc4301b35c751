"""scripts/gpu-check.sh, the one command that validates a GPU machine: what it does where there is no GPU
(--dry-run lists every step; a real run refuses at once), and how it runs its steps, checked with stand-in
programs on the PATH (a failed step is recorded and the later steps still run)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"
STEPS = ["preflight", "build", "tests", "memcheck", "racecheck", "bench-ops", "bench-layer", "train-gpt2",
         "train-1.3b", "nsys"]  # fmt: skip
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def _run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _no_gpu_env(tmp_path):
    """A PATH whose nvidia-smi finds no GPU, whatever this machine has."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed: no devices were found' >&2\nexit 9\n")
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_the_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_finds_nothing():
    r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_the_budget_at_the_top_fits_in_ten_minutes():
    """The per-step bounds stated in the header are the ones the steps run under, and add up to < 600 s."""
    text = SCRIPT.read_text()
    header = {line.split()[1]: int(line.split()[2]) for line in text.splitlines()
              if line.startswith("#   ") and len(line.split()) > 3 and line.split()[3] == "s"}  # fmt: skip
    assert list(header) == STEPS
    for name, bound in header.items():
        assert f"step {name} {bound} " in text, f"{name}: the header says {bound} s, the step says otherwise"
    assert sum(header.values()) < 600


def test_dry_run_prints_every_step_and_its_command_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    r = _run("--dry-run", out, env=_no_gpu_env(tmp_path))
    assert r.returncode == 0, r.stderr
    for name in STEPS:
        assert f"[{name}] (at most " in r.stdout, name
    assert "MEGACORE_CUDA=1 MEGACORE_CUDA_ARCH=" in r.stdout
    assert "pip install --no-build-isolation --no-deps --no-index -e ." in r.stdout
    assert "--tool memcheck" in r.stdout and "--tool racecheck" in r.stdout
    assert "--model gpt-1.3b" in r.stdout and "--profile-steps 3" in r.stdout
    assert not out.exists()


def test_without_a_gpu_it_stops_at_once_with_one_clear_line(tmp_path):
    out = tmp_path / "out"
    r = _run(out, env=_no_gpu_env(tmp_path))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("gpu-check: no GPU here"), r.stderr
    assert "--dry-run" in r.stderr
    assert not out.exists(), "nothing may be half-done without a GPU"


def test_without_outdir_it_prints_the_usage():
    r = _run("--dry-run")
    assert r.returncode == 2 and "usage: bash scripts/gpu-check.sh" in r.stderr


def test_a_failed_step_is_recorded_and_the_later_steps_still_run(tmp_path):
    """Stand-ins for nvidia-smi, nvcc, compute-sanitizer and python: the test suite fails, the rest pass; no
    nsys on the PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "nvidia-smi", 'case "$*" in *compute_cap*) echo 9.0;; *name*) echo "NVIDIA H100 80GB HBM3";; '
                                 "*) echo GPU 0;; esac\n")  # fmt: skip
    _stub(bin_dir, "nvcc", "echo 'Build cuda_13.0'\n")
    _stub(bin_dir, "compute-sanitizer", 'shift $#; echo "========= ERROR SUMMARY: 0 errors"\n')
    _stub(bin_dir, "python3", """case "$*" in
  *"import pytest_timeout"*|*"import xdist"*) exit 1 ;;
  *"pytest tests -q"*) echo "1 failed, 2 passed in 0.1s"; exit 3 ;;
  *"--profile-steps"*) echo profiled ;;
  *"benchmarks train"*) echo "| bfloat16 | 8 x 1024 | 123,456 | - | - | - | 40% of 989 TFLOP/s (bf16 dense peak) | - | - |" ;;
  *) echo "stand-in python $*" ;;
esac
""")  # fmt: skip
    out = tmp_path / "out dir"  # a space, to check the quoting
    env = dict(os.environ, PATH=f"{bin_dir}:{SYSTEM_PATH}", PYTHON="python3")
    r = _run(out, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    summary = (out / "SUMMARY.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in summary.splitlines() if line.startswith("| ")}
    assert [name for name in rows if name in STEPS] == STEPS
    assert "FAIL (exit 3)" in rows["tests"] and "1 failed, 2 passed" in rows["tests"]
    for name in ["preflight", "build", "memcheck", "racecheck", "bench-ops", "bench-layer", "train-gpt2", "train-1.3b"]:
        assert "| pass |" in rows[name], rows[name]
    assert "ERROR SUMMARY: 0 errors" in rows["memcheck"]
    assert "123,456" in rows["train-1.3b"]
    assert "skipped (nsys not on the PATH)" in rows["nsys"]
    assert "**Failed:** tests" in summary
    assert "MEGACORE_CUDA_ARCH=90" in summary
    for name in STEPS:
        assert (out / f"{name}.log").exists(), name
    assert f"--junitxml={out}/tests.xml".replace(" ", "\\ ") in (out / "tests.log").read_text()
