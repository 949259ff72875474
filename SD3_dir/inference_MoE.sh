#!/usr/bin/env bash
# SD3: style x content weight grid for frequency-MoE adapters (live merge).
# Usage: [STYLE_LORA=... CONTENT_LORA=...] bash SD3_dir/inference_MoE.sh GPU_ID [extra flags]   (see docs/merging.md)
# Without STYLE_LORA / CONTENT_LORA: the newest style + content runs of BACKBONE that RUN_FILTER accepts, under exps_*/ (scripts/find_runs.sh).
BACKBONE=sd3 RUN_FILTER="--methods moe" RUN_HINT="SD3_dir/train_moe_sty.sh and SD3_dir/train_moe_cnt.sh" \
  DEFAULT_PROMPT="a photo of a <c> cat in <s> style" DEFAULT_OUT=outputs_SD3/merge_moe \
  exec bash "$(dirname "$0")/../scripts/launch_inference.sh" SD3_dir/inference_moe.py "$@"
