#!/usr/bin/env bash
# FLUX content adapter, Q and R trained together (fast convergence).
# Usage: bash flux_dir/train_QR_cnt.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=flux METHOD=qr TASK=cnt exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
