#!/usr/bin/env bash
# The body of every merge-inference wrapper:  launch_inference.sh ENTRY_SCRIPT GPU_ID [extra flags...]
# Set by the wrapper: DEFAULT_MODEL, DEFAULT_STEPS, DEFAULT_SIZE, DEFAULT_PROMPT, DEFAULT_OUT.
# Environment overrides: MODEL_NAME, STYLE_LORA, CONTENT_LORA, RESIDUAL (unset: delta form), PROMPT,
# STYLE_WEIGHTS, CONTENT_WEIGHTS, STEPS, GUIDANCE, HEIGHT, WIDTH, SEED, DTYPE, OUTPUT_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ENTRY="$1"; shift
(( $# >= 1 )) || die "usage: bash <wrapper> GPU_ID [extra flags...]"
select_devices "$1"; shift
[[ -n "${STYLE_LORA:-}" ]] || die "set STYLE_LORA to the style adapter (pytorch_lora_weights.safetensors)"
[[ -n "${CONTENT_LORA:-}" ]] || die "set CONTENT_LORA to the content adapter (pytorch_lora_weights.safetensors)"

FLAGS=(--model_path "${MODEL_NAME:-$DEFAULT_MODEL}"
       --style_lora_path "$STYLE_LORA" --content_lora_path "$CONTENT_LORA"
       --prompt "${PROMPT:-$DEFAULT_PROMPT}"
       --style_weights "${STYLE_WEIGHTS:-0.0,0.5,1.0}" --content_weights "${CONTENT_WEIGHTS:-0.0,0.5,1.0}"
       --num_inference_steps "${STEPS:-$DEFAULT_STEPS}"
       --height "${HEIGHT:-$DEFAULT_SIZE}" --width "${WIDTH:-$DEFAULT_SIZE}" --seed "${SEED:-0}"
       --output_dir "${OUTPUT_DIR:-$DEFAULT_OUT}")
[[ -n "${RESIDUAL:-}" ]] && FLAGS+=(--residual_path "$RESIDUAL")
[[ -n "${GUIDANCE:-}" ]] && FLAGS+=(--guidance_scale "$GUIDANCE")
[[ -n "${DTYPE:-}" ]] && FLAGS+=(--dtype "$DTYPE")
exec python "$REPO_ROOT/$ENTRY" "${FLAGS[@]}" "$@"
