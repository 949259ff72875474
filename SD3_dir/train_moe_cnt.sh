#!/usr/bin/env bash
# SD3 content adapter, frequency mixture of 8 experts.
# Usage: bash SD3_dir/train_moe_cnt.sh GPU_IDS RANK [extra trainer flags...]   (see docs/training.md)
BACKBONE=sd3 METHOD=moe TASK=cnt METHOD_FLAGS=--moe_num_experts=8 exec bash "$(dirname "$0")/../scripts/launch_train.sh" "$0" "$@"
