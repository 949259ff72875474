#!/usr/bin/env bash
# SD3 style adapter, frequency mixture of 8 experts (2000 steps as published).
# Usage: bash SD3_dir/train_moe_sty.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=sd3 METHOD=moe TASK=sty DEFAULT_STEPS=2000 METHOD_FLAGS=--moe_num_experts=8 exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
