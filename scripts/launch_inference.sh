#!/usr/bin/env bash
# The body of every merge-inference wrapper:  launch_inference.sh ENTRY_SCRIPT GPU_ID [extra flags...]
# Set by the wrapper: BACKBONE, DEFAULT_PROMPT, DEFAULT_OUT, RUN_FILTER (flags of `python -m qrlora.runs` beside
# --backbone: which runs fit this wrapper) and RUN_HINT (the wrappers that train them). The model id, steps and
# image size are the backbone's own (its class in qrlora/backbones/, read by scripts/backbone_defaults.py).
# Environment overrides: MODEL_NAME, STYLE_LORA, CONTENT_LORA, RESIDUAL (unset: delta form), PROMPT,
# STYLE_WEIGHTS, CONTENT_WEIGHTS, STEPS, GUIDANCE, HEIGHT, WIDTH, SEED, DTYPE, OUTPUT_DIR.
# STYLE_LORA / CONTENT_LORA unset: the newest style and content runs of one backbone, method and rank
# (scripts/find_runs.sh), and MODEL_NAME unset then means the base model those runs recorded.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
source "$(dirname "${BASH_SOURCE[0]}")/find_runs.sh"

ENTRY="$1"; shift
(( $# >= 1 )) || die "usage: bash <wrapper> GPU_ID [extra flags...]"
select_devices "$1"; shift
BACKBONE_DEFAULTS="$("${PYTHON:-python}" "$REPO_ROOT/scripts/backbone_defaults.py" "${BACKBONE:-}")" || exit 2
eval "$BACKBONE_DEFAULTS"   # DEFAULT_MODEL, DEFAULT_INFERENCE_STEPS, DEFAULT_SIZE
if [[ -z "${STYLE_LORA:-}" || -z "${CONTENT_LORA:-}" ]]; then
  # shellcheck disable=SC2086  # RUN_FILTER is a list of flags
  find_pair "set STYLE_LORA and CONTENT_LORA to adapter files, or train a pair with ${RUN_HINT:-the training wrappers}" \
    --backbone "$BACKBONE" ${RUN_FILTER:-}
  STYLE_LORA="${STYLE_LORA:-$FOUND_STYLE_LORA}"
  CONTENT_LORA="${CONTENT_LORA:-$FOUND_CONTENT_LORA}"
  if [[ -z "${MODEL_NAME:-}" && -n "$FOUND_MODEL" ]]; then
    MODEL_NAME="$FOUND_MODEL"
    echo "model:       $MODEL_NAME (the base model the runs recorded)" >&2
  fi
fi

FLAGS=(--model_path "${MODEL_NAME:-$DEFAULT_MODEL}"
       --style_lora_path "$STYLE_LORA" --content_lora_path "$CONTENT_LORA"
       --prompt "${PROMPT:-$DEFAULT_PROMPT}"
       --style_weights "${STYLE_WEIGHTS:-0.0,0.5,1.0}" --content_weights "${CONTENT_WEIGHTS:-0.0,0.5,1.0}"
       --num_inference_steps "${STEPS:-$DEFAULT_INFERENCE_STEPS}"
       --height "${HEIGHT:-$DEFAULT_SIZE}" --width "${WIDTH:-$DEFAULT_SIZE}" --seed "${SEED:-0}"
       --output_dir "${OUTPUT_DIR:-$DEFAULT_OUT}")
[[ -n "${RESIDUAL:-}" ]] && FLAGS+=(--residual_path "$RESIDUAL")
[[ -n "${GUIDANCE:-}" ]] && FLAGS+=(--guidance_scale "$GUIDANCE")
[[ -n "${DTYPE:-}" ]] && FLAGS+=(--dtype "$DTYPE")
run_command python "$REPO_ROOT/$ENTRY" "${FLAGS[@]}" "$@"   # DRY_RUN=1: print it only
