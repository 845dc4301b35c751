#!/usr/bin/env bash
# Sets up megacore in the current Python environment: uses the installed torch (any >= 2.4, CPU or
# CUDA) and installs torch==2.13.0 only where none is installed; then the build tools and the
# package itself, built with CMake against that torch (never an isolated build, which would fetch
# another torch). Safe to re-run: the CMake build is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

if "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" - <<'PY'
import sys, torch
v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if v < (2, 4):
    sys.exit(f"megacore needs torch >= 2.4; this environment has torch {torch.__version__}. "
             "Upgrade it yourself (megacore never replaces an installed torch).")
print(f"megacore setup: using the installed torch {torch.__version__}")
PY
else
  echo "megacore setup: no torch installed; installing torch==2.13.0"
  "$PYTHON" -m pip install -q torch==2.13.0
fi

# The build tools: `--no-build-isolation` builds with what is installed. None of them depends on torch.
"$PYTHON" -m pip install -q pybind11 ninja "cmake>=3.26" setuptools wheel
# megacore in place, with what pyproject.toml declares: its runtime dependencies (numpy, safetensors, tokenizers,
# tqdm, pyyaml, pydantic, sacrebleu, rouge-score) and the test extra (pytest, hypothesis, transformers). The installed torch satisfies
# torch>=2.4, so pip keeps it; the constraint pins it, so a dependency that wanted another torch fails here
# instead of replacing it.
TORCH_PIN="$(mktemp)"
trap 'rm -f "$TORCH_PIN"' EXIT
"$PYTHON" -c "from importlib.metadata import version; print('torch==' + version('torch'))" > "$TORCH_PIN"
"$PYTHON" -m pip install -q --no-build-isolation -c "$TORCH_PIN" -e ".[test]"
"$PYTHON" -c "import megacore, json; print('megacore setup: built', json.dumps(megacore.build_info()))"
