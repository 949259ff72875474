#!/usr/bin/env bash
# CLIP-T, CLIP-I (style) and DINO (content) scores of merge grids: per-image CSV, per-cell table, trade-off plot.
#
#   bash test/evaluate_merge.sh GPU [extra flags for python -m qrlora.evaluate]
#
#   GPU           a GPU id (sets CUDA_VISIBLE_DEVICES) or `cpu`
#   IMAGES        folder(s) with generated images and a manifest.json, space-separated (default: the newest merge
#                 grid the merge wrappers wrote under outputs_*/ of the current folder)
#   STYLE_REFS    style reference images  (default: assets/sty/swirl_painting)
#   CONTENT_REFS  content reference images (default: assets/cnt/cat)
#   CLIP_MODEL    default: openai/clip-vit-large-patch14 (hub id or local folder)
#   DINO_MODEL    default: facebook/dino-vits16 (hub id or local folder; facebook/dinov2-base works too)
#   OUTPUT_DIR    default: output_eval/merge_eval-<date>
#   PYTHON        interpreter (default: python)
#
# Example: IMAGES="out/direct out/klora" bash test/evaluate_merge.sh 0
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../scripts/common.sh"   # select_devices, REPO_ROOT, PYTHONPATH
(( $# >= 1 )) || die "usage: bash $0 GPU|cpu [extra flags]"
select_devices "$1"
shift
PYTHON="${PYTHON:-python}"
if [[ -z "${IMAGES:-}" ]]; then
  IMAGES="$(ls -1dt outputs_*/*/ 2>/dev/null | while read -r d; do
              [[ -f "$d/manifest.json" ]] && { echo "${d%/}"; break; }; done || true)"
  [[ -n "$IMAGES" ]] || die "no merge grid with a manifest.json under outputs_*/: run a merge wrapper first, or set IMAGES=FOLDER"
  echo "IMAGES (newest merge grid): $IMAGES" >&2
fi
STYLE_REFS="${STYLE_REFS:-$REPO_ROOT/assets/sty/swirl_painting}"
CONTENT_REFS="${CONTENT_REFS:-$REPO_ROOT/assets/cnt/cat}"
CLIP_MODEL="${CLIP_MODEL:-openai/clip-vit-large-patch14}"
DINO_MODEL="${DINO_MODEL:-facebook/dino-vits16}"
OUTPUT_DIR="${OUTPUT_DIR:-output_eval/merge_eval-$(date +%Y%m%d-%H%M%S)}"

read -r -a image_dirs <<<"$IMAGES"
echo "OUTPUT_DIR: $OUTPUT_DIR"
run_command "$PYTHON" -m qrlora.evaluate --images "${image_dirs[@]}" --style_refs "$STYLE_REFS" --content_refs "$CONTENT_REFS" \
    --clip_model "$CLIP_MODEL" --dino_model "$DINO_MODEL" --output_dir "$OUTPUT_DIR" "$@"
