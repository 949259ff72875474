#!/usr/bin/env bash
# Per-layer similarity (cosine, linear CKA, NMI) of two adapter files: figures + JSON.
#
#   bash test/visualize_qrlora_similarity.sh GPU [extra flags for test/visualize_qrlora_similarity.py]
#
#   GPU           a GPU id (sets CUDA_VISIBLE_DEVICES) or `cpu`
#   LORA1_PATH    first adapter  (default: the newest style run under exps_*/, see below)
#   LORA2_PATH    second adapter (default: the newest content run of the same backbone, method and rank)
#   LORA1_NAME    label of the first  (default: sty)
#   LORA2_NAME    label of the second (default: cnt)
#                 Runs are looked for under exps_*/ in the current folder, the repository root and
#                 flux_dir/ SD3_dir/ SDXL_dir/ (scripts/find_runs.sh); the choice is printed.
#   OUTPUT_DIR    default: output_vis/qrlora_sim-<date>
#   FIXED_SCALE   1 (default): fixed metric axes; 0: automatic axes
#   BINS          NMI histogram bins (default: 64)
#   BASELINE1_PATH, BASELINE2_PATH   if both set: --compare mode against this plain-LoRA pair (paper figure)
#   PYTHON        interpreter (default: python)
#
# Example: LORA1_PATH=a.safetensors LORA2_PATH=b.safetensors bash test/visualize_qrlora_similarity.sh 0 --bins 32
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"   # select_devices, REPO_ROOT, PYTHONPATH
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/find_runs.sh"  # find_pair
(( $# >= 1 )) || die "usage: bash $0 GPU|cpu [extra flags]"
select_devices "$1"
shift
PYTHON="${PYTHON:-python}"
if [[ -z "${LORA1_PATH:-}" || -z "${LORA2_PATH:-}" ]]; then
  find_pair "set LORA1_PATH and LORA2_PATH to two adapter files, or train a style and a content run first (e.g. flux_dir/train_deltaR_sty.sh and flux_dir/train_deltaR_cnt.sh)"
  LORA1_PATH="${LORA1_PATH:-$FOUND_STYLE_LORA}"
  LORA2_PATH="${LORA2_PATH:-$FOUND_CONTENT_LORA}"
fi
LORA1_NAME="${LORA1_NAME:-sty}"
LORA2_NAME="${LORA2_NAME:-cnt}"
OUTPUT_DIR="${OUTPUT_DIR:-output_vis/qrlora_sim-$(date +%Y%m%d-%H%M%S)}"
FIXED_SCALE="${FIXED_SCALE:-1}"
BINS="${BINS:-64}"
BASELINE1_PATH="${BASELINE1_PATH:-}"
BASELINE2_PATH="${BASELINE2_PATH:-}"

args=(
    --lora1_path "$LORA1_PATH"
    --lora2_path "$LORA2_PATH"
    --lora1_name "$LORA1_NAME"
    --lora2_name "$LORA2_NAME"
    --output_dir "$OUTPUT_DIR"
    --bins "$BINS"
)
if [[ "$FIXED_SCALE" == "1" ]]; then
    args+=(--fixed_scale)
fi
if [[ -n "$BASELINE1_PATH" || -n "$BASELINE2_PATH" ]]; then
    args+=(--compare --baseline1_path "$BASELINE1_PATH" --baseline2_path "$BASELINE2_PATH")
fi

echo "OUTPUT_DIR: $OUTPUT_DIR"
if ! is_dry_run; then
  mkdir -p "$OUTPUT_DIR"
  cp "${BASH_SOURCE[0]}" "$OUTPUT_DIR/vis_script.sh"  # what produced these figures, next to them
fi
run_command "$PYTHON" "$REPO_ROOT/test/visualize_qrlora_similarity.py" "${args[@]}" "$@"   # DRY_RUN=1: print it only
