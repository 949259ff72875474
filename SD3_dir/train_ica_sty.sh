#!/usr/bin/env bash
# SD3 style adapter, ICA basis.
# Usage: bash SD3_dir/train_ica_sty.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=sd3 METHOD=ica TASK=sty exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
