"""`pip wheel --no-build-isolation .` produces a wheel that installs and works in a fresh virtualenv
that has torch (here: one that sees this interpreter's torch through --system-site-packages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_virtualenv(tmp_path):
    wheels = tmp_path / "wheels"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = wheels.glob("megacore-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    script = (
        "import megacore, torch, sys\n"
        "assert megacore.__file__.startswith(sys.prefix), megacore.__file__\n"
        "x = torch.randn(4, 8)\n"
        "torch.testing.assert_close(megacore.ops.bias_gelu(x, None), torch.nn.functional.gelu(x, approximate='tanh'))\n"
        "print(megacore.build_info()['cpu_isas'])\n"
    )
    r = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DEFAULT" in r.stdout
    r = subprocess.run([str(venv / "bin" / "megacore"), "info"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and '"cpu_isas"' in r.stdout, r.stderr
