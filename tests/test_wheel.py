"""The wheel declares what it needs: `pip wheel --no-build-isolation .` builds a wheel that, installed with its
dependencies into a fresh virtualenv that holds nothing but torch, runs `megacore train` (the main job's first
steps) and keeps that torch.

The wheel build reuses the CMake build directory that setup.py keys on this Python, torch, cmake and the CMake
arguments (build/<hash>), the one `pip install --no-build-isolation -e .` uses too: after scripts/setup.sh it
is incremental (~10 s); from a clean tree it compiles everything (~5 CPU-minutes). Measured on 2 shared cores:
~3 minutes in all, mostly installing torch into the virtualenv (~1.5 min) and the dependencies (~30 s);
the training run ~35 s, half of it preparing the embedded corpus.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 900)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)


@pytest.mark.slow
def test_wheel_installs_with_its_dependencies_into_a_fresh_virtualenv_and_trains(tmp_path):
    wheels = tmp_path / "wheels"
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", wheels, ROOT],
             timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = wheels.glob("megacore-*.whl")

    # No --system-site-packages: the virtualenv sees only what is installed into it. No PYTHONPATH: megacore must
    # come from the wheel, not from this source tree.
    venv = tmp_path / "venv"
    r = _run([sys.executable, "-m", "venv", venv])
    assert r.returncode == 0, r.stderr[-3000:]
    py, env = venv / "bin" / "python", {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    # This interpreter's torch, as a user installs it before megacore (pip.conf may point at a local wheel dir).
    r = _run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__}"], env=env)
    if r.returncode != 0:
        pytest.skip(f"cannot install torch=={torch.__version__} into a fresh virtualenv here: {r.stderr[-500:]}")

    # With its dependencies: pip resolves them and keeps the installed torch, which satisfies torch>=2.4.
    r = _run([py, "-m", "pip", "install", "-q", wheel], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run([py, "-m", "pip", "check"], env=env)
    assert r.returncode == 0, r.stdout[-3000:]
    r = _run([py, "-c", "import torch; print(torch.__version__)"], env=env)
    assert r.stdout.strip() == torch.__version__, "installing megacore replaced torch: " + r.stdout + r.stderr

    script = (
        "import megacore, torch, sys\n"
        "assert megacore.__file__.startswith(sys.prefix), megacore.__file__\n"
        "x = torch.randn(4, 8)\n"
        "torch.testing.assert_close(megacore.ops.bias_gelu(x, None), torch.nn.functional.gelu(x, approximate='tanh'))\n"
        "print(megacore.build_info()['cpu_isas'])\n"
    )
    r = _run([py, "-c", script], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DEFAULT" in r.stdout
    megacore = venv / "bin" / "megacore"
    r = _run([megacore, "info"], cwd=tmp_path, env=env)
    assert r.returncode == 0 and '"cpu_isas"' in r.stdout, r.stderr
    r = _run([megacore, "train", "--help"], cwd=tmp_path, env=env)
    assert r.returncode == 0 and "--train-steps" in r.stdout, r.stderr[-3000:]

    # The main job's first steps; the first run prepares the embedded corpus (tokenizers, tqdm) into the cache.
    run = tmp_path / "run"
    r = _run([megacore, "train", "--train-steps", "2", "--log-interval", "1", "--eval-interval", "100",
              "--eval-batches", "1", "--save-interval", "100", "--output", run, "--cache-dir", tmp_path / "cache",
              "--no-progress"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (run / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
