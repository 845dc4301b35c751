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

# Build tools and test tools; none of them depends on torch, so pip leaves torch alone.
"$PYTHON" -m pip install -q numpy pytest hypothesis pybind11 ninja "cmake>=3.26" setuptools wheel
# Runtime (safetensors: checkpoints) and the interop/test extra (transformers: the Hugging Face models the
# interop and the tests compare with). Neither depends on torch, so pip leaves torch alone.
"$PYTHON" -m pip install -q safetensors "transformers>=4.40"
# --no-deps: the dependencies are in place, and pip must not resolve torch again.
"$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
"$PYTHON" -c "import megacore, json; print('megacore setup: built', json.dumps(megacore.build_info()))"
