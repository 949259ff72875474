#!/usr/bin/env bash
# MoE expert usage of an adapter during sampling: heatmap (layers x experts), per-step curve, JSON.
#
#   bash test/analyze_moe_experts.sh GPU [extra flags for test/analyze_moe_experts.py]
#
#   GPU           a GPU id (sets CUDA_VISIBLE_DEVICES) or `cpu`
#   MODEL_NAME    base pipeline folder or hub id (default: the base model the adapter recorded;
#                 MODEL_PATH, the older name, still works)
#   LORA_PATH     MoE adapter (default: the newest MoE style run under exps_*/, else the newest MoE run;
#                 looked for in the current folder, the repository root and flux_dir/ SD3_dir/ SDXL_dir/)
#   PROMPT        one prompt (default: "a cat in <s> style"; empty: none); ignored when PROMPTS_FILE is set
#                 (extra --prompt flags add to it)
#   PROMPTS_FILE  text file, one prompt per line
#   NUM_STEPS     denoising steps per prompt (default: 10)
#   OUTPUT_DIR    default: output_vis/moe_experts-<date>
#   PYTHON        interpreter (default: python)
#
# Example: LORA_PATH=moe.safetensors bash test/analyze_moe_experts.sh 0 --prompt "a dog in <s> style"
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"   # select_devices, REPO_ROOT, PYTHONPATH
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/find_runs.sh"  # find_latest
(( $# >= 1 )) || die "usage: bash $0 GPU|cpu [extra flags]"
select_devices "$1"
shift
PYTHON="${PYTHON:-python}"
MODEL_NAME="${MODEL_NAME:-${MODEL_PATH:-}}"
if [[ -z "${LORA_PATH:-}" ]]; then
  find_latest "set LORA_PATH to a MoE adapter file, or train one with SD3_dir/train_moe_sty.sh" --methods moe
  LORA_PATH="$FOUND_LORA"
  MODEL_NAME="${MODEL_NAME:-$FOUND_MODEL}"
fi
if [[ -z "$MODEL_NAME" ]]; then
  found="$("$PYTHON" -m qrlora.runs model --adapter "$LORA_PATH" --hint "set MODEL_NAME to its base pipeline")" || exit 2
  eval "$found"
  MODEL_NAME="$FOUND_MODEL"
fi
PROMPT="${PROMPT-a cat in <s> style}"  # PROMPT= (empty): only the --prompt flags given after GPU
PROMPTS_FILE="${PROMPTS_FILE:-}"
NUM_STEPS="${NUM_STEPS:-10}"
OUTPUT_DIR="${OUTPUT_DIR:-output_vis/moe_experts-$(date +%Y%m%d-%H%M%S)}"

args=(
    --model_path "$MODEL_NAME"
    --lora_path "$LORA_PATH"
    --num_inference_steps "$NUM_STEPS"
    --output_dir "$OUTPUT_DIR"
)
if [[ -n "$PROMPTS_FILE" ]]; then
    args+=(--prompts_file "$PROMPTS_FILE")
elif [[ -n "$PROMPT" ]]; then
    args+=(--prompt "$PROMPT")
fi

echo "OUTPUT_DIR: $OUTPUT_DIR"
run_command "$PYTHON" "$REPO_ROOT/test/analyze_moe_experts.py" "${args[@]}" "$@"   # DRY_RUN=1: print it only
