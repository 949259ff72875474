#!/usr/bin/env bash
# One prepared GPU check for every backbone (issue 28), in one call of at most 8 minutes on one NVIDIA GPU with no
# network: the real-size rehearsal (bench/rehearsal.py) of FLUX.1-dev with every block first (the 24 GB recipe rests
# on its estimate), then SD3-medium and SDXL, random weights built and decomposed on the GPU,
# torch.cuda.max_memory_allocated of the training phase beside the fake-tensor estimate; then FLUX's step time against
# PEFT LoRA (bench/gpu_flux.py's train part). Every part gets at most 140 s (600 dry) and none runs past the
# call's --budget (a part that would start too late is recorded as not started); each writes its JSON as it ends, so
# a part cut at a limit loses only itself. Reports go to --output (default bench/results/gpu_check).
#
#   bash bench/prepare_gpu_wheels.sh           # once, where the package index is reachable (docs/real-size.md)
#   bash bench/gpu_check.sh [--output DIR] [--workdir DIR] [--budget S]   # on the GPU machine; --workdir holds the
#                                              # parts' run folders (full-size checkpoints; default: --output)
#   bash bench/gpu_check.sh --cpu-dry-run --output DIR    # the same code on the CPU at reduced size (the tests)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-$(command -v python3 || command -v python)}"  # the GPU image has python3 only
out="$repo/bench/results/gpu_check"
work=""
budget=""
dry=0
backbones="flux sd3 sdxl"
usage="--output DIR, --workdir DIR, --budget SECONDS, --cpu-dry-run, --backbones 'flux sd3 sdxl'"
while [ $# -gt 0 ]; do
    case "$1" in
        --output) out="$2"; shift 2 ;;
        --workdir) work="$2"; shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        --cpu-dry-run) dry=1; shift ;;
        --backbones) backbones="$2"; shift 2 ;;
        *) echo "bench/gpu_check.sh: unknown argument $1 ($usage)" >&2; exit 2 ;;
    esac
done
if [ -n "$budget" ] && ! [[ "$budget" =~ ^[0-9]+$ ]]; then
    echo "bench/gpu_check.sh: --budget takes whole seconds, not '$budget'" >&2
    exit 2
fi
work="${work:-$out}"
mkdir -p "$out" "$work"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
source "$here/gpu_site.sh"  # the wheels the GPU image lacks, from bench/gpu_wheels/ (no network)
if [ "$dry" = 1 ]; then
    args=(--device cpu --cpu-dry-run)
    part_limit=600
    budget="${budget:-1500}"
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "bench/gpu_check.sh: no NVIDIA GPU found; use --cpu-dry-run for the CPU check" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    args=(--device cuda --full-depth)
    part_limit=140
    budget="${budget:-480}"  # 8 minutes: the rehearsals, then the PEFT comparison in what is left
fi
deadline=$(( $(date +%s) + budget ))
for b in $backbones; do
    "$python" -m bench.rehearsal --backbone "$b" "${args[@]}" --timeout "$part_limit" --deadline "$deadline" \
        --workdir "$work/work_$b" --output "$out/rehearsal_$b.json" || echo "bench/gpu_check.sh: rehearsal $b exited $?"
done
if [ "$dry" = 0 ]; then
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -ge 60 ]; then
        timeout "$(( left < 150 ? left : 150 ))" "$python" -m bench.gpu_flux --output "$out/gpu_flux.json" \
            --no-quantized --no-memory --no-fsdp || echo "bench/gpu_check.sh: gpu_flux exited $?"
    else
        echo "bench/gpu_check.sh: gpu_flux not started: ${left} s of the ${budget} s budget left"
    fi
fi
echo "bench/gpu_check.sh: results in $out"
