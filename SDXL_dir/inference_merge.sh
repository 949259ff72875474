#!/usr/bin/env bash
# SDXL: style x content weight grid.
# Usage: [STYLE_LORA=... CONTENT_LORA=...] bash SDXL_dir/inference_merge.sh GPU_ID [extra flags]   (see README: Merging and inference)
# Without STYLE_LORA / CONTENT_LORA: the newest style + content runs that RUN_FILTER accepts, under exps_*/ (scripts/find_runs.sh).
RUN_FILTER="--backbone sdxl --static" RUN_HINT="SDXL_dir/train_deltaR_sty.sh and SDXL_dir/train_deltaR_cnt.sh" \
  DEFAULT_MODEL=stabilityai/stable-diffusion-xl-base-1.0 DEFAULT_STEPS=30 DEFAULT_SIZE=1024 DEFAULT_PROMPT="a photo of a <c> cat in <s> style" DEFAULT_OUT=outputs_SDXL/merge \
  exec bash "$(dirname "$0")/../scripts/launch_inference.sh" SDXL_dir/inference_merge.py "$@"
