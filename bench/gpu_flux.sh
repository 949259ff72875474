#!/usr/bin/env bash
# FLUX.1-dev-sized benchmark on one NVIDIA GPU: init time of every targeted layer (ours vs the published
# algorithm), then training step time and peak GPU memory at 512 px, batch 1, gradient checkpointing, rank 64,
# triu_deltaR vs PEFT LoRA (and on an NF4 / fp8 quantized base when bitsandbytes / torchao is installed).
# Then every row of the CPU estimate bench/reports/flux_memory.json that fits the GPU (no block swap), measured with
# torch.cuda.max_memory_allocated and written beside the estimate (--memory-output; give
# bench/reports/flux_memory.json to fill the FLUX memory table of docs/memory.md; --memory-budget seconds, default 240).
# Then the trainer's sharded path: an FSDP launch (accelerate launch --config_file configs/accelerate_fsdp.yaml, 2 processes
# on 2+ GPUs, 1 on one GPU) of 4 steps on a tiny FLUX pipeline and a resume from step 2, which must be exact (--no-fsdp skips it).
# Random bf16 weights built from the published config: nothing is downloaded. Prints a table, writes bench/results/gpu_flux.json
# (or the path given with --output). Under 8 minutes on an H100/H200-class GPU.
#
#   bash bench/gpu_flux.sh [--output PATH] [--no-quantized] [--no-memory] [--memory-output PATH] [--no-fsdp]
#
# On a machine without an NVIDIA GPU it says so and exits 0.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU image has python3 only

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu_flux.sh: no NVIDIA GPU found (nvidia-smi missing or sees no device); skipping the FLUX GPU benchmark."
    exit 0
fi
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "bench/gpu_flux.sh: nvidia-smi sees a GPU but this torch has no CUDA (torch.cuda.is_available() is False); skipping."
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
source "$here/gpu_site.sh"  # the wheels the GPU image lacks, from bench/gpu_wheels/ (no network)
# bench is a package (python -m bench.gpu_flux): the repository root on PYTHONPATH finds it from any folder,
# with the in-tree qrlora, while relative paths in the arguments keep meaning the caller's folder.
PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m bench.gpu_flux "$@"
