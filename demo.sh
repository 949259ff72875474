#!/usr/bin/env bash
# QR-LoRA end to end, CPU only, offline, in a few minutes on 2 cores (see README.md, "The demo"):
#   1. render the adapters' images in the shipped CPU world (assets/world, a trained SD3 pipeline; docs/world.md: The CPU
#      world): 4 hearts in flat style (new content), 4 circles in checker style (new style)
#   2. train a content and a style QR-LoRA adapter through the real wrappers on them
#      (and a plain-LoRA pair in the same trainer, for the disentanglement comparison)
#   3. extract the residual from the content adapter
#   4. render a 3x3 style x content weight grid of "a heart in checker style" in residual form and in delta form,
#      check they agree; render the plain-LoRA pair's grid; read every cell with the world's classifier and draw
#      both pairs side by side (verdict.png), one verdict line per pair
#   5. plot the adapters' similarity (QR-LoRA pair against the plain-LoRA pair)
# Environment overrides: DEMO_DIR (demo_output), STEPS (100 training steps per adapter), RANK (4).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh

DEMO_DIR="${DEMO_DIR:-demo_output}"
STEPS="${STEPS:-100}"
RANK="${RANK:-4}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # tiny models: one thread per process is fastest
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The demo owns DEMO_DIR: it rebuilds a folder it made before, and never touches anything else.
if [[ -e "$DEMO_DIR" && ! -e "$DEMO_DIR/.qrlora-demo" ]]; then
  die "$DEMO_DIR exists and was not made by demo.sh; set DEMO_DIR to a new folder"
fi
rm -rf "$DEMO_DIR"; mkdir -p "$DEMO_DIR"; touch "$DEMO_DIR/.qrlora-demo"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "1/5 the CPU world: adapter images"
MODEL=assets/world
WORLD_FLAGS=(--max_sequence_length 8)   # the T5 prompt length the world was trained with (assets/world/README.md)
python -m qrlora.world images --shape heart --style flat --output "$DEMO_DIR/data/heart_flat"
python -m qrlora.world images --shape circle --style checker --output "$DEMO_DIR/data/circle_checker"

train() {  # train WRAPPER OUTPUT SHAPE STYLE [extra flags]
  local wrapper="$1" out="$2" shape="$3" style="$4"; shift 4
  MODEL_NAME="$MODEL" OUTPUT_DIR="$DEMO_DIR/$out" MAX_TRAIN_STEPS="$STEPS" RESOLUTION=32 MIXED_PRECISION=no \
    INSTANCE_DIR="$DEMO_DIR/data/${shape}_$style" bash "$wrapper" cpu "$RANK" --learning_rate 1e-2 --train_batch_size 4 --gradient_accumulation_steps 1 \
    --instance_prompt "a $shape in $style style" --validation_prompt "a $shape in $style style" --validation_inference_steps 20 --num_validation_images 1 \
    "${WORLD_FLAGS[@]}" "$@" \
    2> "$DEMO_DIR/$out.log" || { tail -n 5 "$DEMO_DIR/$out.log" >&2; die "training $out failed (log: $DEMO_DIR/$out.log)"; }
  grep -ho "triu_deltaR rank.*\|lora rank.*" "$DEMO_DIR/$out.log" | head -n 1 || true
}
step "2/5 training: content and style (triu_deltaR), then the plain-LoRA pair"
train SD3_dir/train_deltaR_cnt.sh content heart flat
train SD3_dir/train_deltaR_sty.sh style circle checker
train SD3_dir/train_deltaR_cnt.sh lora_content heart flat --lora_init_method lora
train SD3_dir/train_deltaR_sty.sh lora_style circle checker --lora_init_method lora
CONTENT="$DEMO_DIR/content/pytorch_lora_weights.safetensors"
STYLE="$DEMO_DIR/style/pytorch_lora_weights.safetensors"

step "3/5 residual from the content adapter's stored Q and R"
python SD3_dir/extract_residual_from_checkpoint.py --model_path "$MODEL" --lora_path "$CONTENT" \
  --output_dir "$DEMO_DIR/residual"

step "4/5 3x3 weight grids: residual form and delta form, then the plain-LoRA pair"
render() {  # render OUT [RESIDUAL] [STYLE CONTENT]
  MODEL_NAME="$MODEL" STYLE_LORA="${3:-$STYLE}" CONTENT_LORA="${4:-$CONTENT}" RESIDUAL="${2:-}" STEPS=20 HEIGHT=32 WIDTH=32 \
    GUIDANCE=4 PROMPT="a heart in checker style" DTYPE=float32 OUTPUT_DIR="$DEMO_DIR/$1" \
    bash SD3_dir/inference.sh cpu "${WORLD_FLAGS[@]}" 2>/dev/null
}
render grid_residual "$DEMO_DIR/residual/sd3_residual_weights.safetensors"
render grid_delta
python - "$DEMO_DIR/grid_residual" "$DEMO_DIR/grid_delta" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
a, b = map(Path, sys.argv[1:3])
names = sorted(p.name for p in a.glob("inference_s*_c*.png"))
diff = max(int(np.abs(np.asarray(Image.open(a / n), dtype=np.int16) - np.asarray(Image.open(b / n), dtype=np.int16)).max()) for n in names)
verdict = "agree" if diff <= 1 else "DISAGREE"
print(f"residual form and delta form {verdict}: {len(names)} images, max pixel difference {diff}/255")
sys.exit(0 if diff <= 1 else 1)
PY
render grid_lora "" "$DEMO_DIR/lora_style/pytorch_lora_weights.safetensors" "$DEMO_DIR/lora_content/pytorch_lora_weights.safetensors"
echo "the world's classifier on every cell (green in $DEMO_DIR/verdict.png: both the heart and the checker style):"
python -m qrlora.world verdict --grid "QR-LoRA pair=$DEMO_DIR/grid_delta" --grid "LoRA pair=$DEMO_DIR/grid_lora" \
  --study bench/reports/world_study.json --output "$DEMO_DIR/verdict.png" 2>/dev/null

step "5/5 similarity: content vs style (Q, R, dR), then dW against the plain-LoRA pair"
similarity() {  # similarity OUT [env...]
  local out="$1"; shift
  env LORA1_PATH="$CONTENT" LORA2_PATH="$STYLE" LORA1_NAME=content LORA2_NAME=style OUTPUT_DIR="$DEMO_DIR/$out" "$@" \
    bash test/visualize_qrlora_similarity.sh cpu > "$DEMO_DIR/$out.log" 2>&1 \
    || { tail -n 5 "$DEMO_DIR/$out.log" >&2; die "similarity analysis failed (log: $DEMO_DIR/$out.log)"; }
}
similarity similarity
similarity similarity_vs_lora BASELINE1_PATH="$DEMO_DIR/lora_content/pytorch_lora_weights.safetensors" \
  BASELINE2_PATH="$DEMO_DIR/lora_style/pytorch_lora_weights.safetensors"
grep -A6 "^dW similarity" "$DEMO_DIR/similarity_vs_lora.log" || true

step "done in $(( $(date +%s) - start ))s. Everything is under $DEMO_DIR/:"
cat <<MSG
  data/                              the adapters' training images, rendered in the CPU world
  content/, style/                   adapters (pytorch_lora_weights.safetensors), validation images, wrapper copy
  lora_content/, lora_style/         the plain-LoRA baseline pair from the same trainer
  residual/                          sd3_residual_weights.safetensors (W - s Q R)
  grid_residual/grid.png             3x3 style x content grid of "a heart in checker style", residual form
  grid_delta/grid.png                the same grid, delta form (no residual file)
  grid_lora/grid.png                 the plain-LoRA pair's grid
  verdict.png                        both pairs' grids side by side, each cell captioned by the classifier
  similarity/                        per-layer cosine / CKA / NMI of Q, R, dR, dW: plots, JSON, summary
  similarity_vs_lora/                dW similarity of the QR-LoRA pair beside the plain-LoRA pair (paper figure)
MSG
