#!/usr/bin/env bash
# One pass of the GPU checklist, for a session that is lent a CUDA machine (its device time is
# short, so everything runs from one command). Run from the repository root on the GPU machine:
#
#   OUT=/path/to/results bash tools/gpu_session.sh
#
# 1. the whole test suite on the GPU (the cuda-marked tests run; Triton runs natively, not
#    interpreted), 2. the quick tier on CUDA (acceptance shapes, triton included), 3. the issue
#    targets at real heads (core tier, the operations the targets name). Results land in $OUT;
#    commit them under bench/results/. Peers (liger-kernel, cut-cross-entropy, pytest-benchmark,
#    matplotlib) must be importable there: carry them as wheels (see the device tool's README).
set -uo pipefail
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$out/pytest-cuda.log" | tail -3
python -m bench --quick --out "$out" 2>&1 | tee "$out/bench-quick.log" | tail -20
python -m bench --tier core --ops linear_cross_entropy,tdpo_loss,dpo_loss,vocab_stats_kl --out "$out" \
    2>&1 | tee "$out/bench-core.log" | tail -40
