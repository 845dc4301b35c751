#!/usr/bin/env bash
# The one command that validates megacore on a GPU: run it once, unattended, on a fresh GPU machine that has a
# CUDA build of torch and nvcc (H100/H200; nothing is downloaded). It builds megacore with CUDA for this GPU,
# runs the whole test suite, compute-sanitizer (memcheck, racecheck) over the CUDA op tests, the op, layer and
# training benchmarks, and an Nsight Systems profile of three training steps when nsys is present. Every log,
# table and profile goes under OUTDIR, with a one-page OUTDIR/SUMMARY.md. A step that fails does not stop the
# later ones; the exit status is non-zero when any step failed.
#
#   bash scripts/gpu-check.sh OUTDIR              run every step
#   bash scripts/gpu-check.sh --dry-run OUTDIR    print the steps (the exact commands) and exit 0
#
# Time budget (each step runs under `timeout`; the bounds add up to 580 s, under 10 minutes on an H100):
#   preflight       15 s   the GPU, the tools, the Python packages megacore needs (none can be downloaded
#                          there: what the image lacks travels as wheels in .whl/, from scripts/gpu-wheels.sh)
#   build          110 s   pip install --no-build-isolation --no-deps --no-index -e . with MEGACORE_CUDA=1
#   tests          200 s   python -m pytest tests, all failures reported (8 workers with pytest-xdist,
#                          120 s per test with pytest-timeout, where installed)
#   memcheck        40 s   compute-sanitizer --tool memcheck over tests/ops -k "cuda and not compile"
#   racecheck       40 s   compute-sanitizer --tool racecheck over the same tests
#   bench-ops       40 s   megacore bench ops, bf16, CUDA, eager (no torch.compile column: its compiles
#                          alone would take minutes)
#   bench-layer     30 s   megacore bench layer, bf16, hidden 1024 and 2048, CUDA, eager
#   train-gpt2      40 s   megacore bench train --model gpt2-small, bf16, 8 x 1024 tokens, vs Hugging Face, eager
#   train-1.3b      40 s   megacore bench train --model gpt-1.3b, bf16, 4 x 2048 tokens, MFU vs the bf16 peak
#   nsys            25 s   nsys profile of three gpt2-small training steps (skipped without nsys)
# A step past its bound gets SIGINT (pytest then still prints its summary), SIGKILL 5 s later.
# Environment: PYTHON (default python3).
set -uo pipefail  # no -e: a failed step is recorded, and the later steps still run
PYTHON="${PYTHON:-python3}"

usage() { echo "usage: bash scripts/gpu-check.sh [--dry-run] OUTDIR" >&2; exit 2; }
DRY_RUN=0
OUTDIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^# Environment/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) usage ;;
    *) [[ -z "$OUTDIR" ]] || usage; OUTDIR="$arg" ;;
  esac
done
[[ -n "$OUTDIR" ]] || usage
OUTDIR="$(realpath -m -- "$OUTDIR")"  # the steps run in the repository's root
cd "$(dirname "$0")/.." || exit 2
OUT="$(printf %q "$OUTDIR")"          # as it is written into the commands

# ---- the machine -----------------------------------------------------------------------------------------
have_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
    "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}
if have_gpu; then
  # compute capability "9.0" -> CMake's "90"
  ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')"
  GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)"
elif [[ "$DRY_RUN" == 1 ]]; then
  ARCH="<compute capability, e.g. 90>"
  GPU="(no GPU on this machine)"
else
  echo "gpu-check: no GPU here (nvidia-smi found none, or torch.cuda.is_available() is False with $PYTHON); run it on a GPU machine, or pass --dry-run to see the steps" >&2
  exit 1
fi

# ---- packages the GPU image lacks (pydantic): wheels carried in .whl/, fetched by scripts/gpu-wheels.sh ------
if [[ "$DRY_RUN" == 0 ]] && compgen -G ".whl/*.whl" >/dev/null; then
  WHEEL_SITE="$(mktemp -d)"
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WHEEL_SITE" .whl/*.whl; then
    export PYTHONPATH="$WHEEL_SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu-check: could not install the wheels in .whl/; the preflight step will name what is missing" >&2
  fi
fi

SANITIZER="$(command -v compute-sanitizer || true)"
[[ -n "$SANITIZER" || ! -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]] ||
  SANITIZER="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
NSYS="$(command -v nsys || true)"
PYTEST_OPTS=""
"$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1 && PYTEST_OPTS+=" --timeout=120"
"$PYTHON" -c "import xdist" >/dev/null 2>&1 && PYTEST_OPTS+=" -n 8"
OP_TESTS="-m pytest tests/ops -q -p no:cacheprovider -k 'cuda and not compile'"

# ---- the steps: name, time bound (s), command, and why it is skipped on this machine (empty: it runs) --------
STEPS=()
step() { STEPS+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"${4:-}"); }
step preflight 15 "nvidia-smi && $PYTHON -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' && nvcc --version | tail -n1 && $PYTHON -c 'import importlib.util as u, sys; need = [\"numpy\", \"safetensors\", \"tokenizers\", \"tqdm\", \"yaml\", \"pydantic\", \"pytest\", \"hypothesis\", \"transformers\", \"cmake\", \"ninja\", \"pybind11\", \"setuptools\"]; missing = [m for m in need if u.find_spec(m) is None]; print(\"missing Python packages:\", missing or \"none\"); sys.exit(1 if missing else 0)'"
step build 110 "MEGACORE_CUDA=1 MEGACORE_CUDA_ARCH=$ARCH $PYTHON -m pip install --no-build-isolation --no-deps --no-index -e . && $PYTHON -c 'import json, megacore; info = megacore.build_info(); print(json.dumps(info)); assert info[\"cuda\"], \"built without CUDA\"'"
step tests 200 "OMP_NUM_THREADS=2 $PYTHON -m pytest tests -q -p no:cacheprovider -rfE$PYTEST_OPTS --junitxml=$OUT/tests.xml"
no_sanitizer="$([[ -n "$SANITIZER" ]] || echo "compute-sanitizer not found")"
step memcheck 40 "${SANITIZER:-compute-sanitizer} --tool memcheck --leak-check no --error-exitcode 1 $PYTHON $OP_TESTS" "$no_sanitizer"
step racecheck 40 "${SANITIZER:-compute-sanitizer} --tool racecheck --error-exitcode 1 $PYTHON $OP_TESTS" "$no_sanitizer"
step bench-ops 40 "$PYTHON -m megacore.benchmarks ops --device cuda --dtypes bfloat16 --no-compile"
step bench-layer 30 "$PYTHON -m megacore.benchmarks layer --device cuda --dtypes bfloat16 --hidden 1024 2048 --no-compile"
step train-gpt2 40 "$PYTHON -m megacore.benchmarks train --device cuda --dtypes bfloat16 --model gpt2-small --batch 8 --seq 1024 --no-compile"
step train-1.3b 40 "$PYTHON -m megacore.benchmarks train --device cuda --dtypes bfloat16 --model gpt-1.3b --batch 4 --seq 2048 --no-hf --no-compile"
step nsys 25 "${NSYS:-nsys} profile --force-overwrite true --capture-range cudaProfilerApi --capture-range-end stop --trace cuda,nvtx,cublas --output $OUT/train-gpt2-3steps $PYTHON -m megacore.benchmarks train --device cuda --dtypes bfloat16 --model gpt2-small --batch 8 --seq 1024 --profile-steps 3" \
  "$([[ -n "$NSYS" ]] || echo "nsys not on the PATH")"

if [[ "$DRY_RUN" == 1 ]]; then
  echo "gpu-check --dry-run: $GPU; would write logs, tables and SUMMARY.md under $OUTDIR"
  for s in "${STEPS[@]}"; do
    IFS=$'\t' read -r name bound cmd skip <<<"$s"
    printf '[%s] (at most %s s)%s %s\n' "$name" "$bound" "${skip:+ (skipped here: $skip)}" "$cmd"
  done
  exit 0
fi

# ---- run them ----------------------------------------------------------------------------------------------
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
RESULTS=()
failed=0
for s in "${STEPS[@]}"; do
  IFS=$'\t' read -r name bound cmd skip <<<"$s"
  log="$OUTDIR/$name.log"
  if [[ -n "$skip" ]]; then
    echo "skipped: $skip" >"$log"
    RESULTS+=("$name"$'\t'"skipped ($skip)"$'\t'"0"$'\t'"$bound")
    echo "gpu-check: $name skipped: $skip"
    continue
  fi
  echo "gpu-check: $name (at most $bound s): $cmd"
  echo "\$ $cmd" >"$log"
  start=$SECONDS
  timeout --signal=INT --kill-after=5 "$bound" bash -c "$cmd" >>"$log" 2>&1
  rc=$?
  took=$((SECONDS - start))
  if [[ $rc == 0 ]]; then status="pass"
  elif [[ $rc == 124 || $rc == 137 ]]; then status="FAIL (timed out after $bound s)"; failed=1
  else status="FAIL (exit $rc)"; failed=1
  fi
  RESULTS+=("$name"$'\t'"$status"$'\t'"$took"$'\t'"$bound")
  echo "gpu-check: $name: $status in $took s"
done

# ---- SUMMARY.md: one line per step, then the key numbers read off the logs ---------------------------------
key_numbers() {  # the line(s) of a step's log worth a glance
  local log="$OUTDIR/$1.log"
  case "$1" in
    preflight) grep -m1 "^missing Python packages" "$log" ;;
    build) grep -m1 -o '"cuda": [a-z]*, "cuda_archs": \[[^]]*\]' "$log" ;;
    tests) grep -E "^(=+ )?[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s" "$log" | tail -n1 ;;
    memcheck|racecheck) grep -m1 "ERROR SUMMARY" "$log" ;;
    train-gpt2|train-1.3b) grep -E "^\| bfloat16" "$log" | sed 's/^| //; s/ |$//' ;;
    nsys) find "$OUTDIR" -maxdepth 1 -name 'train-gpt2-3steps.*' -printf '%f\n' ;;
    *) grep -c "^| " "$log" | sed 's/$/ table rows/' ;;
  esac
}
{
  echo "# GPU check — $GPU"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
    "$("$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")' 2>/dev/null)," \
    "MEGACORE_CUDA_ARCH=$ARCH. Each step's full output is <step>.log beside this file."
  echo
  echo "| step | result | seconds (bound) | key numbers |"
  echo "| --- | --- | --- | --- |"
  for r in "${RESULTS[@]}"; do
    IFS=$'\t' read -r name status took bound <<<"$r"
    numbers="$(key_numbers "$name" 2>/dev/null | sed 's/|/\\|/g' | paste -sd '\t' | sed 's/\t/; /g')"
    echo "| $name | $status | $took ($bound) | $numbers |"
  done
  echo
  echo "Training rows: dtype, batch x seq, megacore tok/s, HF tok/s, megacore compile tok/s, HF compile tok/s," \
    "MFU, vs HF, vs HF compile (the tables are in train-gpt2.log and train-1.3b.log; ops and layer tables in" \
    "bench-ops.log and bench-layer.log)."
  if [[ $failed == 1 ]]; then
    echo
    echo "**Failed:** $(for r in "${RESULTS[@]}"; do IFS=$'\t' read -r n st _ <<<"$r"; [[ $st == FAIL* ]] && printf '%s ' "$n"; done)"
  fi
} >"$OUTDIR/SUMMARY.md"
echo "gpu-check: wrote $OUTDIR/SUMMARY.md"
exit $failed
