#!/usr/bin/env bash
# SD3 style adapter, SVD basis.
# Usage: bash SD3_dir/train_svd_sty.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=sd3 METHOD=svd TASK=sty exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
