#!/usr/bin/env bash
# Sets everything up, then runs megacore's main job: `megacore train`, which prepares the embedded Austen
# corpus (once, cached) and trains gpt-tiny on it (CPU: under 10 minutes on 2 cores). Extra arguments go
# to `megacore train` (see `megacore train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/setup.sh
exec "$PYTHON" -m megacore train "$@"
