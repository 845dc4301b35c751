#!/usr/bin/env bash
# Sets everything up, then runs megacore's main job. Until training lands (see the issues), that is
# the fused-op benchmark: megacore vs PyTorch eager vs torch.compile. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/setup.sh
exec "$PYTHON" -m megacore bench ops "$@"
