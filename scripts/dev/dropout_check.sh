#!/usr/bin/env bash
# Device verification of attention dropout and cascade attention (one command, staged
# time limits; logs under $OUT): build, GPU tests, then the prefill dropout benchmark
# and the cascade benchmark. STAGES="build tests bench cascade" (default all).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FASTATTN_REQUIRE_CUDA=1
OUT=${OUT:-/tmp/fastattn-out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build tests bench cascade"}
has() { [[ " $STAGES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
if has build; then
  t0=$(date +%s)
  python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s, $(du -m python/fastattn/_C*.so | cut -f1) MB"
fi
if has tests; then
  timeout ${TEST_TIMEOUT:-240} python -m pytest -q -m cuda -p no:cacheprovider ${TESTS:-tests/test_dropout.py tests/test_cascade.py} > "$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tests.log" | head -30
  echo "tests: $(tail -1 "$OUT/tests.log")"
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-240} python -m benchmarks.prefill --no-flex --impls fastattn,sdpa-flash \
    --dropout ${DROPOUT:-0.1} --rounds ${ROUNDS:-2} ${BENCH_ARGS:-} --out "$OUT" > "$OUT/prefill.log" 2>&1
  tail -40 "$OUT/prefill.log"
fi
if has cascade; then
  timeout ${CASCADE_TIMEOUT:-150} python -m benchmarks.cascade --rounds 2 --prefixes 2048,8192 --batches 16,64 \
    --suffix 512 > "$OUT/cascade.log" 2>&1
  tail -16 "$OUT/cascade.log"
  timeout 90 python scripts/dev/cascade_parts.py 8192 64 512 2>&1 | tail -12
fi
