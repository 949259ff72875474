#!/usr/bin/env bash
# SD3 content adapter, triangular dR (triu_deltaR).
# Usage: bash SD3_dir/train_deltaR_cnt.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=sd3 METHOD=triu_deltaR TASK=cnt exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
