#!/usr/bin/env bash
# One device command for a session's verification run (device time is scarce):
# full build, the linear-attention GPU tests, the whole GPU suite, then quick
# benchmarks, each under its own time limit so one slow stage cannot starve the
# rest; a summary prints last. Carry .whl (fla-core, einops) for the linear
# anchor. Stages: STAGES="build linear suite bench dist cp" (default all):
# dist = the context-parallel GPU tests, cp = benchmarks.context_parallel at
# N = 1 and a 2-process gloo sanity run on the one GPU; sanitize = memcheck over
# scripts/sanitizer_subset.py; mixed = the one-launch mixed-batch (BatchAttention)
# GPU tests and benchmarks.paged --mixed-only (not in the default list).
#   bash scripts/dev/session_check.sh
#   STAGES="linear bench" SKIP_BUILD=1 bash scripts/dev/session_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FASTATTN_REQUIRE_CUDA=1
OUT=${OUT:-/tmp/fastattn-out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build linear suite bench dist cp sanitize"}
summary=()
has() { [[ " $STAGES " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
if has build && [ -z "${SKIP_BUILD:-}" ]; then
  t0=$(date +%s)
  if python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
    summary+=("build: $(( $(date +%s) - t0 )) s")
  else
    tail -30 "$OUT/build.log"; exit 1
  fi
fi
if has linear; then
  timeout ${LINEAR_TIMEOUT:-240} python -m pytest -q -m cuda tests/test_linear_inference.py tests/test_linear.py \
    tests/test_linear_train_ops.py \
    -p no:cacheprovider > "$OUT/linear_tests.log" 2>&1
  summary+=("linear GPU tests: $(tail -1 "$OUT/linear_tests.log")")
  grep -E "^(FAILED|ERROR)" "$OUT/linear_tests.log" | head -15
fi
if has mixed; then
  timeout ${MIXED_TIMEOUT:-150} python -m pytest -q -m cuda tests/test_batch_attention.py \
    tests/test_example_continuous_batching.py -p no:cacheprovider > "$OUT/mixed_tests.log" 2>&1
  summary+=("mixed-batch GPU tests: $(tail -1 "$OUT/mixed_tests.log")")
  grep -E "^(FAILED|ERROR)" "$OUT/mixed_tests.log" | head -15
  timeout ${MIXED_BENCH_TIMEOUT:-120} python -m benchmarks.paged --no-flex --mixed-only --out "$OUT" \
    > "$OUT/paged_mixed.log" 2>&1; tail -14 "$OUT/paged_mixed.log"
fi
if has suite; then
  timeout ${SUITE_TIMEOUT:-420} python -m pytest -q -m cuda tests -p no:cacheprovider \
    --deselect tests/test_linear_inference.py --deselect tests/test_linear.py \
    --deselect tests/test_linear_train_ops.py \
    --deselect tests/test_distributed.py --deselect tests/test_partial_ops.py > "$OUT/suite.log" 2>&1
  summary+=("GPU suite (pytest -m cuda tests; linear, distributed, partial-op files deselected: own stages): $(tail -1 "$OUT/suite.log")")
  grep -E "^(FAILED|ERROR)" "$OUT/suite.log" | head -15
fi
if has dist; then
  timeout ${DIST_TIMEOUT:-200} python -m pytest -q -m cuda tests/test_distributed.py tests/test_partial_ops.py \
    -p no:cacheprovider \
    > "$OUT/dist_tests.log" 2>&1
  summary+=("context-parallel GPU tests: $(tail -1 "$OUT/dist_tests.log")")
  grep -E "^(FAILED|ERROR)" "$OUT/dist_tests.log" | head -15
fi
if has cp; then
  timeout ${CP_TIMEOUT:-200} python -m benchmarks.context_parallel --seqlens ${CP_SEQLENS:-32768,131072} \
    > "$OUT/cp_bench.log" 2>&1; tail -14 "$OUT/cp_bench.log"
  timeout 120 torchrun --nproc-per-node 2 -m benchmarks.context_parallel --backend gloo --seqlens 16384 \
    --modes fwd --reps 1 --methods ring,ulysses > "$OUT/cp_gloo.log" 2>&1; tail -8 "$OUT/cp_gloo.log"
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-200} python -m benchmarks.linear --quick --rounds ${BENCH_ROUNDS:-3} ${BENCH_ARGS:-} \
    --out "$OUT" > "$OUT/linear_bench.log" 2>&1
  tail -30 "$OUT/linear_bench.log"
fi
if has sanitize; then
  timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool memcheck python scripts/sanitizer_subset.py \
    > "$OUT/memcheck.log" 2>&1
  summary+=("memcheck: $(grep -E "ERROR SUMMARY|sanitizer subset" "$OUT/memcheck.log" | tr '\n' ' ')")
fi
printf '%s\n' "${summary[@]}"
