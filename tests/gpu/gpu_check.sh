#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, proves that a GPU worker installed
# per the README uses it. Prints the GPU and what the worker's CUDA check finds (devices,
# the CUDA libraries CTranslate2 opens and where they were loaded from), then runs the
# tests marked `gpu` (tests/gpu): the libraries load from the environment alone and
# cuBLAS starts; faster-whisper picks cuda/float16 and hears the sample; CPU and CUDA
# agree; and an enrolled GPU worker transcribes samples/talk.mp4 on cuda, `status`
# showing "ran on:   cuda"; batched decoding picks its batch size from the free VRAM and
# int8_float16 loads. A machine whose GPU CTranslate2 cannot use fails, naming why
# (MORAG_TEST_REQUIRE_GPU=1 turns those tests' skips into failures). Then it prints the
# GPU's speed against the CPU's (bench/gpu_vs_cpu.py: the CPU, CUDA, CUDA batched).
#
# Needs what ops/setup.sh sets up (.venv with the gpu extra, RabbitMQ, PostgreSQL).
# Usage: tests/gpu/gpu_check.sh [pytest arguments]
# Exit status: 0 every check passed; 1 one failed; 2 no NVIDIA GPU here, nothing checked;
# 124 the tests ran past GPU_CHECK_TIMEOUT seconds (default 900), or the benchmark past its bound.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none): nothing checked" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
# What a worker here reports (hardware, and its CUDA check); exits 1, naming why, when the
# GPU cannot be used.
.venv/bin/python -m pipeline.hardware
status=0
MORAG_TEST_REQUIRE_GPU=1 timeout "${GPU_CHECK_TIMEOUT:-900}" \
  .venv/bin/pytest tests/gpu -m gpu -q -ra -p no:cacheprovider "$@" || status=$?
# The GPU against the CPU: the same files, the same model, real-time factors and speed-up
# (bench/gpu_vs_cpu.py), bounded by GPU_BENCH_SECONDS (default 180).
timeout "$(( ${GPU_BENCH_SECONDS:-180} + 120 ))" .venv/bin/python -m bench.gpu_vs_cpu --rounds 3 \
  --max-seconds "${GPU_BENCH_SECONDS:-180}" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
exit "$status"
