#!/usr/bin/env bash
# The prepared GPU check of issue 13 (item 6): one table of step latency at the released 26B-A4B shapes
# with random weights (bf16, fp8, int4; batch 1 and 8; context 1K and 32K) next to the weight-bandwidth
# roofline, fast-vs-plain parity on the device, peak memory and the compile / CUDA-graph modes.
# Finishes within 8 minutes on one H100 / H200 (hard limit below; the script itself skips what would
# start after 7 minutes).
#
#   bash benchmarks/gpu_check.sh                        # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --device cpu --tiny    # the CPU dry run (tests/test_gpu_check.py)
#   bash benchmarks/gpu_check.sh --json out.json        # also keep the rows
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader || true
fi
exec timeout 480 python benchmarks/gpu_check.py "$@"
