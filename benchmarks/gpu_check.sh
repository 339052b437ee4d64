#!/usr/bin/env bash
# The accelerator check: GPU-marked tests, the hypothesis property tests under the
# `gpu` profile, then every benchmarks/bench_*.py present, each under a time limit.
#
# Run from anywhere with the machine's own python3 (nothing is pip-installed except
# wheels carried in .whl/):
#
#     bash benchmarks/gpu_check.sh
#
# Environment:
#   OUT            if set, all output is also written to $OUT/gpu_check.log
#   PYTHON         interpreter (default: python3)
#   BENCH_TIMEOUT  seconds per benchmark file (default: 300)
#   TEST_TIMEOUT   seconds per pytest run (default: 900)
#   EQX_CURV_QUICK=1  tiny settings, for a dry run on CPU (benchmarks read it too):
#                  JAX_PLATFORMS=cpu EQX_CURV_QUICK=1 bash benchmarks/gpu_check.sh
#
# Exit status: 0 if every step passed, 1 otherwise. A step whose files do not exist
# yet is reported as skipped, not failed.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

PYTHON=${PYTHON:-python3}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-300}
TEST_TIMEOUT=${TEST_TIMEOUT:-900}
QUICK=${EQX_CURV_QUICK:-0}
export EQX_CURV_QUICK=$QUICK PYTHONUNBUFFERED=1

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

# Wheels carried for packages the image lacks (beartype for jaxtyping's pytest hook).
if compgen -G ".whl/*.whl" > /dev/null; then
    echo "== installing carried wheels into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl || echo "!! wheel install failed"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== environment ($(date -u +%FT%TZ))"
"$PYTHON" - <<'PY' || echo "!! could not import jax"
import platform, jax
print("python", platform.python_version(), "| jax", jax.__version__)
print("devices:", jax.devices())
PY

# pyproject's addopts load jaxtyping's pytest plugin with beartype; without beartype
# run pytest without those addopts (and say so) rather than not at all.
PYTEST_ARGS=(-q -p no:cacheprovider)
if ! "$PYTHON" -c "import beartype" 2> /dev/null; then
    echo "!! beartype missing: pytest runs WITHOUT jaxtyping runtime checks"
    PYTEST_ARGS+=(-o "addopts=")
fi

declare -a SUMMARY=()
FAILED=0

record() {  # name, exit code
    local name=$1 code=$2 verdict
    case $code in
        0) verdict=ok ;;
        5) verdict="ok (no tests collected)" ;;
        124 | 137) verdict="TIMEOUT"; FAILED=1 ;;
        *) verdict="FAILED (exit $code)"; FAILED=1 ;;
    esac
    SUMMARY+=("$(printf '%-45s %s' "$name" "$verdict")")
}

echo "== pytest -m gpu"
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" -m gpu tests
record "pytest -m gpu" $?

# Property tests: the test files that use hypothesis.
mapfile -t PROPERTY_FILES < <(grep -l "hypothesis" tests/test_*.py 2> /dev/null)
if [ "${#PROPERTY_FILES[@]}" -gt 0 ]; then
    profile=gpu
    [ "$QUICK" = 1 ] && profile=dev
    echo "== property tests (HYPOTHESIS_PROFILE=$profile): ${PROPERTY_FILES[*]}"
    HYPOTHESIS_PROFILE=$profile timeout "$TEST_TIMEOUT" \
        "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" -m "not slow and not gpu" "${PROPERTY_FILES[@]}"
    record "property tests ($profile profile)" $?
else
    SUMMARY+=("$(printf '%-45s %s' "property tests" "skipped (none yet)")")
fi

shopt -s nullglob
BENCHES=(benchmarks/bench_*.py)
if [ "${#BENCHES[@]}" -eq 0 ]; then
    SUMMARY+=("$(printf '%-45s %s' "benchmarks" "skipped (none yet)")")
fi
for bench in "${BENCHES[@]}"; do
    echo "== $bench (limit ${BENCH_TIMEOUT}s)"
    timeout "$BENCH_TIMEOUT" "$PYTHON" "$bench"
    record "$bench" $?
done

echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
