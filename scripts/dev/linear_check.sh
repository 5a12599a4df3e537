#!/usr/bin/env bash
# Device dev loop for fastattn.linear: build (unless SKIP_BUILD), the CUDA
# linear tests, then benchmarks/linear.py --quick (fla when its wheel is
# carried in .whl/). Table last.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FASTATTN_REQUIRE_CUDA=1
OUT=${OUT:-/tmp/fastattn-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
if [ -z "${SKIP_BUILD:-}" ]; then
  t0=$(date +%s)
  python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
python -m pytest -q -m cuda tests/test_linear.py tests/test_linear_inference.py tests/test_linear_train_ops.py -p no:cacheprovider \
  ${PYTEST_K:+-k "$PYTEST_K"} ${PYTEST_ARGS:-} > "$OUT/linear_tests.log" 2>&1
echo "linear gpu tests: $(tail -1 "$OUT/linear_tests.log")"
grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/linear_tests.log" | head -30
[ -n "${SKIP_BENCH:-}" ] || timeout ${BENCH_TIMEOUT:-240} python -m benchmarks.linear --quick --rounds 2 ${BENCH_ARGS:-} --out "$OUT" 2>&1 | tail -40
