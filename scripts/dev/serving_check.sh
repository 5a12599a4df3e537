#!/usr/bin/env bash
# Device verification of the serving features (FP8 KV cache, tree verification, Quest;
# one command, staged time limits; logs under $OUT): build, GPU tests (theirs + the decode
# / paged / cascade suites they touch), the decode benchmark with its FP8-cache column, the
# paged benchmark (PAGED_ARGS, e.g. --mixed-only), the Quest benchmark.
# STAGES="build tests bench paged quest" (default:
# build tests bench).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FASTATTN_REQUIRE_CUDA=1
OUT=${OUT:-/tmp/fastattn-out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build tests bench"}
has() { [[ " $STAGES " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
if has build; then
  t0=$(date +%s)
  python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s, $(du -m python/fastattn/_C*.so | cut -f1) MB"
fi
if has tests; then
  timeout ${TEST_TIMEOUT:-240} python -m pytest -q -m cuda -p no:cacheprovider \
    ${TESTS:-tests/test_fp8_kv.py tests/test_tree_verify.py tests/test_quest.py tests/test_decode.py tests/test_paged.py tests/test_cascade.py tests/test_example_continuous_batching.py} > "$OUT/tests.log" 2>&1
  grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/tests.log" | head -30
  echo "tests: $(tail -1 "$OUT/tests.log")"
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-240} python -m benchmarks.decode --no-flex --rounds ${ROUNDS:-2} ${BENCH_ARGS:-} \
    --out "$OUT" > "$OUT/decode.log" 2>&1
  tail -14 "$OUT/decode.log"
fi
if has paged; then
  timeout ${PAGED_TIMEOUT:-240} python -m benchmarks.paged --no-flex ${PAGED_ARGS:-} --out "$OUT" > "$OUT/paged.log" 2>&1
  tail -22 "$OUT/paged.log"
fi
if has quest; then
  timeout ${QUEST_TIMEOUT:-180} python -m benchmarks.quest ${QUEST_ARGS:-} > "$OUT/quest.log" 2>&1
  tail -12 "$OUT/quest.log"
fi
