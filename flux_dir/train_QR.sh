#!/usr/bin/env bash
# FLUX, Q and R trained together (fast convergence) on one task (content by default; TASK=sty for style).
# Usage: bash flux_dir/train_QR.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=flux METHOD=qr TASK=${TASK:-cnt} exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
