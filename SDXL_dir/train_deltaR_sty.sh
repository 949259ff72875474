#!/usr/bin/env bash
# SDXL style adapter, triangular dR (triu_deltaR), on the UNet's attention projections.
# Usage: bash SDXL_dir/train_deltaR_sty.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=sdxl METHOD=triu_deltaR TASK=sty exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
