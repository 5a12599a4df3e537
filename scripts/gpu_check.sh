#!/usr/bin/env bash
# One command for a GPU machine: build, run the GPU tests, run the quick
# prefill benchmark; the benchmark table prints last.
#   bash scripts/gpu_check.sh                 # full build
#   FASTATTN_HDIMS=128 FASTATTN_DTYPES=bf16 bash scripts/gpu_check.sh   # narrowed dev build
#   SKIP_BUILD=1 / SKIP_TESTS=1 / SKIP_BENCH=1 / BENCH_ARGS="--modes fwd" / PYTEST_ARGS="-k varlen"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fastattn-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FASTATTN_REQUIRE_CUDA=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader || true

if [ -z "${SKIP_BUILD:-}" ]; then
  t0=$(date +%s)
  python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s ($(grep -m1 '^fastattn: building' "$OUT/build.log" || true))"
fi
python -c 'import fastattn, torch; assert fastattn.has_cuda_kernels(); print("fastattn CUDA ok on", torch.cuda.get_device_name())' || exit 1

if [ -z "${SKIP_TESTS:-}" ]; then
  python -m pytest -q -m cuda tests ${PYTEST_ARGS:-} -p no:cacheprovider > "$OUT/tests.log" 2>&1
  echo "gpu tests (pytest -m cuda tests): $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  python -m benchmarks.prefill --quick --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
fi
