#!/usr/bin/env bash
# FLUX: compute flux_residual_weights.safetensors from the base model.
# Usage: bash flux_dir/save_flux_residual.sh GPU_ID [extra flags]
# Environment overrides: MODEL_NAME, RANK (64), METHOD (triu_deltaR), SEED (0), OUTPUT_DIR (.)
set -euo pipefail
source "$(dirname "$0")/../scripts/common.sh"
(( $# >= 1 )) || die "usage: bash flux_dir/save_flux_residual.sh GPU_ID [extra flags]"
select_devices "$1"; shift
DEVICE=cuda; [[ "${CUDA_VISIBLE_DEVICES}" == "" ]] && DEVICE=cpu
BACKBONE_DEFAULTS="$("${PYTHON:-python}" "$REPO_ROOT/scripts/backbone_defaults.py" flux)" || exit 2
eval "$BACKBONE_DEFAULTS"   # DEFAULT_MODEL: FLUX's own (qrlora/backbones/flux.py)
run_command python "$REPO_ROOT/flux_dir/save_flux_residual.py" --model_path "${MODEL_NAME:-$DEFAULT_MODEL}" \
  --rank "${RANK:-64}" --lora_init_method "${METHOD:-triu_deltaR}" --seed "${SEED:-0}" \
  --output_dir "${OUTPUT_DIR:-.}" --device "$DEVICE" "$@"
