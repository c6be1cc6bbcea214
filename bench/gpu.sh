#!/usr/bin/env bash
# The GPU suite, for a lent GPU machine (one H100/H200, under 8 minutes with the install):
#   bash bench/gpu.sh
# 1. pytest -m gpu: bf16 vs fp32 loss, FusedAdam vs torch AdamW, flash vs math SDPA,
#    every objective one step through DeepSpeed (ZeRO-2, bf16) on CUDA (tests/test_gpu.py).
# 2. bench_train on CUDA, batch 128: clip-b16 against open_clip's ViT-B-16 twin, and
#    msclip-s-b16, bf16 autocast (open_clip's amp_bf16) and the trainer's bf16 engine, each
#    eager and compiled (ours: model.compile's regions; open_clip: torch.compile of the whole
#    model, its --torchcompile), with FLOPs/sample, TFLOP/s, MFU against the chip's dense
#    spec peak (pipeline/train/mfu.py), the measured matmul rate beside it, compile times and
#    the goal ratios (msclip-s/clip, ours compiled bf16 engine / open_clip compiled amp_bf16).
# 3. profile_step on CUDA: where clip-b16's and msclip-s-b16's bf16 steps spend their time,
#    per kernel, and the kernels per step.
# 4. bench_decode: decode + train crop per CPU core on this machine (the loader's side).
# A GPU machine is lent for minutes, so a failing test never stops the script: the bench
# always runs, both outputs are always appended to bench/RESULTS.md (with the device, the
# command and the date), and the exit status is pytest's (the bench's if the tests passed).
#
# Settings (environment), for machines and checks that are not the default:
#   GPU_SH_PYTHON   an interpreter to use as it is, instead of .venv (a GPU machine with no
#                   package index: its own torch, the missing packages carried as wheels)
#   GPU_SH_DEVICE   the device's name, instead of asking nvidia-smi (required without one)
#   GPU_SH_TESTS    pytest's arguments (default: -m gpu tests/test_gpu.py)
#   GPU_SH_BENCH    bench.bench_train's arguments (default: the B/16 bench above)
#   GPU_SH_PROFILE  bench.profile_step's arguments (default: the B/16 profile above)
#   GPU_SH_DECODE   bench.bench_decode's arguments (default: 200 images, 3 repeats)
#   GPU_SH_RESULTS  the file the figures are appended to (default: bench/RESULTS.md)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${GPU_SH_PYTHON:-}" ]; then
  python="$GPU_SH_PYTHON"
else
  source launch/env.sh || exit 1
  python=python
fi
# no `set -e`: a failing test must not end the script before the bench
device="${GPU_SH_DEVICE:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)}"
[ -n "$device" ] || { echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi found none)" >&2; exit 2; }
tests_args="${GPU_SH_TESTS:--m gpu tests/test_gpu.py}"
bench_args="${GPU_SH_BENCH:---device cuda --model clip-b16 --variants msclip-s-b16 --batch-size 128 --steps 5 --repeats 3 --threads 8 --precisions bf16,bf16_engine --compile}"
profile_args="${GPU_SH_PROFILE:---device cuda --models clip-b16,msclip-s-b16 --precision bf16 --batch-size 128 --steps 2 --rows 10}"
decode_args="${GPU_SH_DECODE:---images 200 --repeats 3}"
results="${GPU_SH_RESULTS:-bench/RESULTS.md}"
tests_log="$(mktemp)"
bench_log="$(mktemp)"
more_log="$(mktemp)"
trap 'rm -f "$tests_log" "$bench_log" "$more_log"' EXIT

# word splitting of the argument strings is intended
# shellcheck disable=SC2086
"$python" -m pytest $tests_args -q -p no:cacheprovider 2>&1 | tee "$tests_log"
tests_rc=${PIPESTATUS[0]}
# shellcheck disable=SC2086
"$python" -m bench.bench_train $bench_args 2>&1 | tee "$bench_log"
bench_rc=${PIPESTATUS[0]}
# shellcheck disable=SC2086
{ echo "\$ python -m bench.profile_step $profile_args"; "$python" -m bench.profile_step $profile_args 2>&1 | grep -v '^{'
  echo "\$ python -m bench.bench_decode $decode_args"; "$python" -m bench.bench_decode $decode_args 2>&1 | grep -v '^{'
} | tee "$more_log"
{
  printf '\n### `bash bench/gpu.sh` — %s on %s\n\n```\n' "$(date -u +%Y-%m-%d)" "$device"
  printf '$ pytest %s   (exit %s)\n' "$tests_args" "$tests_rc"
  tail -n 15 "$tests_log"
  printf '\n$ python -m bench.bench_train %s   (exit %s)\n' "$bench_args" "$bench_rc"
  grep -v '^{' "$bench_log"
  cat "$more_log"
  printf '```\n'
} >> "$results"
echo "bench/gpu.sh: appended the tests' and the bench's output to $results"
[ "$tests_rc" -ne 0 ] && exit "$tests_rc"
exit "$bench_rc"
