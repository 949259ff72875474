#!/usr/bin/env bash
# FLUX style adapter, Q and R trained together (fast convergence).
# Usage: bash flux_dir/train_QR_sty.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=flux METHOD=qr TASK=sty exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
