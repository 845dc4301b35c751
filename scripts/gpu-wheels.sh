#!/usr/bin/env bash
# Fetches, on a machine that reaches PyPI, the wheels of the runtime packages megacore needs that the GPU
# machines' image lacks (pydantic and its own needs; see the device notes), into .whl/ (git-ignored).
# scripts/gpu-check.sh installs whatever is in .whl/ before its steps, so carry .whl with the call.
# Targets CPython 3.12 on manylinux x86_64, the GPU image's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
PACKAGES=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2)
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
ls -1 .whl
