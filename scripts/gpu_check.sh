#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests (tests/test_cuda.py: tracker on CUDA vs CPU, bf16
# vs fp32, one training step, a one-process NCCL DDP step), then the GPU speed table
# (benchmarks.tracker_speed: ms/frame, FPS and peak GPU memory, ResNet-18/101, 1/2/4 objects,
# fp32 and bf16, computed and reused frames, after warm-up), the lockstep throughput table
# (benchmarks.throughput at 480p: ops and frames/s, B=1 against B=8) and compiled against eager
# (benchmarks.tracker_speed --compile; the first compile takes minutes). Without CUDA it says so
# and exits 0.
# Usage: bash scripts/gpu_check.sh [extra benchmarks.tracker_speed args, e.g. --frames 40]
# RVOS_PYTHON=python3 bash scripts/gpu_check.sh uses that Python instead of ./.venv (scripts/setup_env.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch sees no CUDA GPU on this machine; nothing to check (scripts/test.sh runs the CPU tests)"
    exit 0
fi
"$PY" -m pytest -q -rs tests/test_cuda.py
"$PY" -m benchmarks.tracker_speed --dev cuda:0 --precision fp32,bf16 --frames 20 --repeats 3 \
    --configs resnet18:1,resnet18:2,resnet18:4,resnet101:1,resnet101:2,resnet101:4 "$@"
"$PY" -m benchmarks.throughput --dev cuda:0 --size 480x854 --objects 1,3 --frames 20 --sequences 8 --batch 8 \
    --repeats 2
"$PY" -m benchmarks.tracker_speed --dev cuda:0 --compile --frames 20 --repeats 3 --configs resnet18:1,resnet101:4
