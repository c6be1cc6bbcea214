#!/usr/bin/env bash
# The GPU suite, for a lent GPU machine (one H100/H200, under 8 minutes with the install):
#   bash bench/gpu.sh
# 1. pytest -m gpu: bf16 vs fp32 loss, FusedAdam vs torch AdamW, flash vs math SDPA,
#    every objective one step through DeepSpeed (ZeRO-2, bf16) on CUDA (tests/test_gpu.py).
# 2. bench_train on CUDA: clip-b16 against open_clip's ViT-B-16 twin, and msclip-s-b16,
#    fp32, bf16 autocast and the trainer's bf16 engine, each with token dropping 0.5 against
#    open_clip's patch_dropout, with FLOPs/sample and MFU against the measured matmul peak.
# The figures are appended to bench/RESULTS.md with the device, the command and the date;
# the exit status is pytest's.
set -uo pipefail
source "$(dirname "$0")/../launch/env.sh"
device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
[ -n "$device" ] || { echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi found none)" >&2; exit 2; }
tests="$(mktemp)"
python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider > "$tests" 2>&1
tests_rc=$?
bench="$(python -m bench.bench_train --device cuda --model clip-b16 --variants msclip-s-b16 --batch-size 128 \
         --steps 5 --repeats 3 --threads 8 --precisions fp32,bf16,bf16_engine --token-drop 0.5 2>&1 | grep -v '^{')"
{
  printf '\n### `bash bench/gpu.sh` — %s on %s\n\n```\n' "$(date -u +%Y-%m-%d)" "$device"
  tail -n 15 "$tests"
  printf '\n%s\n```\n' "$bench"
} | tee -a bench/RESULTS.md
exit "$tests_rc"
