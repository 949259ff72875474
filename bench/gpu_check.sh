#!/usr/bin/env bash
# One prepared GPU check for every backbone (issue 28), in one call of at most 8 minutes on one NVIDIA GPU with no
# network: the real-size rehearsal (bench/rehearsal.py) of SD3-medium, SDXL and FLUX.1-dev with every block, random
# weights built and decomposed on the GPU, torch.cuda.max_memory_allocated of the training phase beside the
# fake-tensor estimate; then FLUX's step time against PEFT LoRA (bench/gpu_flux.py's train part). Each part writes its
# JSON as it ends (a part killed at its limit loses only itself) under --output (default bench/results/gpu_check).
#
#   bash bench/prepare_gpu_wheels.sh           # once, where the package index is reachable (docs/real-size.md)
#   bash bench/gpu_check.sh [--output DIR] [--workdir DIR]   # on the GPU machine; --workdir holds the parts' run
#                                              # folders (full-size checkpoints; default: the --output folder)
#   bash bench/gpu_check.sh --cpu-dry-run --output DIR    # the same code on the CPU at reduced size (the tests)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU image has python3 only
out="$repo/bench/results/gpu_check"
work=""
dry=0
backbones="sd3 sdxl flux"
while [ $# -gt 0 ]; do
    case "$1" in
        --output) out="$2"; shift 2 ;;
        --workdir) work="$2"; shift 2 ;;
        --cpu-dry-run) dry=1; shift ;;
        --backbones) backbones="$2"; shift 2 ;;
        *) echo "bench/gpu_check.sh: unknown argument $1 (--output DIR, --workdir DIR, --cpu-dry-run, --backbones 'sd3 sdxl flux')" >&2; exit 2 ;;
    esac
done
work="${work:-$out}"
mkdir -p "$out" "$work"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
source "$here/gpu_site.sh"  # the wheels the GPU image lacks, from bench/gpu_wheels/ (no network)
if [ "$dry" = 1 ]; then
    args=(--device cpu --cpu-dry-run)
    limit=600
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "bench/gpu_check.sh: no NVIDIA GPU found; use --cpu-dry-run for the CPU check" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    args=(--device cuda --full-depth)
    limit=140  # seconds per part: three backbones and the PEFT comparison inside 8 minutes
fi
for b in $backbones; do
    "$python" -m bench.rehearsal --backbone "$b" "${args[@]}" --timeout "$limit" --workdir "$work/work_$b" \
        --output "$out/rehearsal_$b.json" || echo "bench/gpu_check.sh: rehearsal $b exited $?"
done
if [ "$dry" = 0 ]; then
    timeout 150 "$python" -m bench.gpu_flux --output "$out/gpu_flux.json" --no-quantized --no-memory --no-fsdp \
        || echo "bench/gpu_check.sh: gpu_flux exited $?"
fi
echo "bench/gpu_check.sh: results in $out"
