#!/usr/bin/env bash
# FLUX style adapter, triangular dR (triu_deltaR).
# Usage: bash flux_dir/train_deltaR_sty.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=flux METHOD=triu_deltaR TASK=sty exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
