#!/usr/bin/env bash
# The accelerator check: GPU-marked tests, the hypothesis property tests under the
# `gpu` profile (matrix roots, Newton-Schulz and Kronecker first, then the rest), then
# the GPU-relevant benchmarks, each under a time limit. The defaults keep the whole
# script under about 9 minutes (one device command may run 10).
#
# Run from anywhere with the machine's own python3 (nothing is pip-installed except
# wheels carried in .whl/):
#
#     bash benchmarks/gpu_check.sh
#
# Environment:
#   OUT            if set, all output is also written to $OUT/gpu_check.log
#   PYTHON         interpreter (default: python3)
#   DEADLINE       seconds for the whole script (default: 540): each step's limit is
#                  cut to what is left, and steps past it are reported as skipped
#   BENCH_TIMEOUT  seconds per benchmark file (default: 100)
#   TEST_TIMEOUT   seconds per pytest run (default: 150)
#   BENCHES        benchmark files to run (default: roots, kronecker, operators, cg;
#                  bench_classical.py is a float64 CPU benchmark and is left out)
#   CIFAR          the CIFAR-10 archive or folder for the study run (default:
#                  data/cifar10-jpg.tar.gz, an ignored folder of the checkout; the
#                  step is skipped if it is missing)
#   CIFAR_STEPS    steps per optimizer of that run (default: 2000)
#   CIFAR_TIMEOUT  seconds for that run (default: 300)
#   CIFAR_ONLY=1   run only the CIFAR-10 study (its own device call of ~8 minutes:
#                  CIFAR_TIMEOUT=480 DEADLINE=500 CIFAR_ONLY=1 bash benchmarks/gpu_check.sh)
#   EQX_CURV_QUICK=1  tiny settings, for a dry run on CPU (benchmarks read it too):
#                  JAX_PLATFORMS=cpu EQX_CURV_QUICK=1 bash benchmarks/gpu_check.sh
#
# Exit status: 0 if every step passed, 1 otherwise. A step whose files do not exist
# yet is reported as skipped, not failed.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

PYTHON=${PYTHON:-python3}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-100}
DEADLINE=${DEADLINE:-540}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
QUICK=${EQX_CURV_QUICK:-0}
export EQX_CURV_QUICK=$QUICK PYTHONUNBUFFERED=1
# The property tests compile with XLA's optimisations on here (the default suite turns
# most of them off to save compile time; tests/conftest.py).
export EQX_CURV_TEST_OPTIMIZED=1

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

limit() {  # the step's own limit, cut to the seconds left before DEADLINE (0: none left)
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -le 5 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

run_step() {  # name, own limit, command...
    local name=$1 own=$2 t
    shift 2
    t=$(limit "$own")
    if [ "$t" -eq 0 ]; then
        SUMMARY+=("$(printf '%-45s %s' "$name" "skipped (deadline)")")
        return
    fi
    timeout "$t" "$@"
    record "$name" $?
}

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

CIFAR=${CIFAR:-data/cifar10-jpg.tar.gz}
CIFAR_STEPS=${CIFAR_STEPS:-2000}
CIFAR_TIMEOUT=${CIFAR_TIMEOUT:-300}
[ "$QUICK" = 1 ] && CIFAR_STEPS=20

cifar_study() {  # Adam and the four strongest second-order methods on real CIFAR-10
    if [ ! -e "$CIFAR" ]; then
        SUMMARY+=("$(printf '%-45s %s' "CIFAR-10 study" "skipped (no $CIFAR)")")
        return
    fi
    echo "== CIFAR-10 study: $CIFAR_STEPS steps (limit ${CIFAR_TIMEOUT}s)"
    run_step "CIFAR-10 study ($CIFAR_STEPS steps)" "$CIFAR_TIMEOUT" \
        "$PYTHON" -m eqx_curv.experiments.cli train --dataset cifar10 \
        --data-dir "$CIFAR" --optimizers adam,kfac,shampoo,soap,muon \
        --steps "$CIFAR_STEPS" --eval-every 500 --chunk 100 --no-progress \
        --out "${OUT:-/tmp}/cifar10-study"
}

if [ "${CIFAR_ONLY:-0}" = 1 ]; then
    cifar_study
    echo "== summary"
    printf '%s\n' "${SUMMARY[@]}"
    exit "$FAILED"
fi

echo "== pytest -m gpu"
run_step "pytest -m gpu" "$TEST_TIMEOUT" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" -m gpu tests

# Property tests: the test files that use hypothesis, the linear-algebra ones first.
profile=gpu
[ "$QUICK" = 1 ] && profile=dev
export HYPOTHESIS_PROFILE=$profile
FIRST=(tests/test_roots.py tests/test_newton_schulz.py tests/test_kronecker.py)
mapfile -t REST < <(grep -l "hypothesis" tests/test_*.py 2> /dev/null |
    grep -v -e test_roots.py -e test_newton_schulz.py -e test_kronecker.py)
for group in FIRST REST; do
    declare -n files=$group
    if [ "${#files[@]}" -eq 0 ]; then
        continue
    fi
    echo "== property tests (HYPOTHESIS_PROFILE=$profile): ${files[*]}"
    run_step "property tests, $group ($profile profile)" \
        "$TEST_TIMEOUT" "$PYTHON" -m pytest "${PYTEST_ARGS[@]}" \
        -m "not slow and not gpu" "${files[@]}"
done

cifar_study

read -r -a BENCH_LIST <<< "${BENCHES:-bench_roots.py bench_kronecker.py bench_operators.py bench_cg.py}"
for name in "${BENCH_LIST[@]}"; do
    bench=benchmarks/${name#benchmarks/}
    if [ ! -f "$bench" ]; then
        SUMMARY+=("$(printf '%-45s %s' "$bench" "skipped (missing)")")
        continue
    fi
    echo "== $bench (limit ${BENCH_TIMEOUT}s)"
    run_step "$bench" "$BENCH_TIMEOUT" "$PYTHON" "$bench"
done

echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
