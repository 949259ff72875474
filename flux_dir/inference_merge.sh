#!/usr/bin/env bash
# FLUX: style x content weight grid.
# Usage: [STYLE_LORA=... CONTENT_LORA=...] bash flux_dir/inference_merge.sh GPU_ID [extra flags]   (see docs/merging.md)
# Without STYLE_LORA / CONTENT_LORA: the newest style + content runs of BACKBONE that RUN_FILTER accepts, under exps_*/ (scripts/find_runs.sh).
BACKBONE=flux RUN_FILTER="--static" RUN_HINT="flux_dir/train_deltaR_sty.sh and flux_dir/train_deltaR_cnt.sh" \
  DEFAULT_PROMPT="a photo of a <c> cat in <s> style" DEFAULT_OUT=outputs_flux/merge \
  exec bash "$(dirname "$0")/../scripts/launch_inference.sh" flux_dir/inference_merge_residual.py "$@"
