#!/usr/bin/env bash
# One prepared check for the H200 machine (Python 3.12, jax 0.11.2 + CUDA, flax, optax,
# orbax, chex, tokenizers installed; no network).  Run from the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # OUT defaults to ./gpu_check_out
#
# 1. installs the project without dependencies (pip install --no-deps -e .) and any
#    wheels carried in .whl/ for packages the machine lacks (ml-collections is not there;
#    make the wheel beforehand with `pip download --no-deps -d .whl ml-collections==1.1.0`;
#    the kernel checks below do not need it);
# 2. records the environment (nvidia-smi, jax devices and versions);
# 3. runs the GPU-marked tests (tests/test_kernel_gpu.py: every kernel impl compiled and
#    run on the device against the references);
# 4. runs benchmarks/bench_attention.py (GB/s, TFLOP/s, fraction of the H200 roofline);
# 5. with the time left, the CUDA-lowering / hardening tests (CI runs them on CPU too).
# Everything lands in $OUT: env.txt, pytest_gpu.log, pytest_lowering.log,
# bench_attention.md / .log, summary.txt.  Each step has its own time limit so the whole
# script stays well inside 10 minutes; a failing step is recorded and the next one runs.
# DRY_RUN=1 skips the install and only lists the benchmark cases (a CPU rehearsal).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
start=$(date +%s)

step() {  # step NAME LIMIT_S CMD... : run with a time limit, log rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$SUMMARY"
  return 0
}

# 1. install (DRY_RUN=1: skip it, and only list the benchmark cases; for a CPU rehearsal)
DRY_RUN="${DRY_RUN:-0}"
[ "$DRY_RUN" = 1 ] && echo "install skipped (dry run)" | tee -a "$SUMMARY" || step install 120 bash -c "
  if ls .whl/*.whl >/dev/null 2>&1; then $PY -m pip install --no-deps --no-index .whl/*.whl; fi
  $PY -m pip install --no-deps --no-build-isolation -e . || $PY -m pip install --no-deps -e ." \
  > "$OUT/install.log" 2>&1

# 2. environment
{
  date -u
  nvidia-smi 2>&1 | head -20
  $PY -c "import sys, jax, jaxlib; print(sys.version); print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices()); print('backend', jax.default_backend())"
  $PY -c "import ml_collections" 2>/dev/null && echo "ml_collections: present" || echo "ml_collections: missing (model tests would need the carried wheel)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 3. device tests first (the point of the machine), 4. the benchmark, 5. lowering tests
#    (also run on CPU in CI) with what time is left.  Budget: ~570 s after the install.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1                    # logs keep every line even if a step times out
step pytest_gpu 280 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kernel_gpu.py \
  -rs --durations=10 > "$OUT/pytest_gpu.log" 2>&1
tail -5 "$OUT/pytest_gpu.log"

left=$(( 570 - ($(date +%s) - start) ))
if [ "$left" -gt 100 ]; then
  lim=$(( left - 60 < 220 ? left - 60 : 220 ))
  dry=""; [ "$DRY_RUN" = 1 ] && dry="--dry_run"
  step bench_attention "$lim" $PY benchmarks/bench_attention.py --iters 10 $dry \
    --out "$OUT/bench_attention.md" > "$OUT/bench_attention.log" 2>&1
  tail -60 "$OUT/bench_attention.log"
else
  echo "bench_attention skipped: ${left}s left" | tee -a "$SUMMARY"
fi

left=$(( 570 - ($(date +%s) - start) ))
if [ "$left" -gt 30 ]; then
  step pytest_lowering "$left" $PY -m pytest -q -p no:cacheprovider tests/test_kernel_hardening.py \
    tests/test_kernels.py -k "cuda or offset or sm90 or materialis or copied or bad" \
    > "$OUT/pytest_lowering.log" 2>&1
  tail -3 "$OUT/pytest_lowering.log"
else
  echo "pytest_lowering skipped: ${left}s left" | tee -a "$SUMMARY"
fi
echo "total seconds=$(( $(date +%s) - start ))" | tee -a "$SUMMARY"
