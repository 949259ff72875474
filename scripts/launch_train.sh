#!/usr/bin/env bash
# The body of every training wrapper. A wrapper sets BACKBONE, METHOD, TASK (sty|cnt) and optionally
# DEFAULT_STEPS / METHOD_FLAGS, then runs:  launch_train.sh WRAPPER_PATH GPU_IDS RANK [trainer flags...]
# Extra trainer flags come last, so they override the defaults below (argparse keeps the last value).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WRAPPER="$1"; shift
(( $# >= 2 )) || die "usage: bash ${WRAPPER#$REPO_ROOT/} GPU_IDS RANK [extra trainer flags...]"
select_devices "$1"
RANK_ARG="$2"; shift 2
[[ "$RANK_ARG" =~ ^[1-9][0-9]*$ ]] || die "RANK must be a positive integer, got '$RANK_ARG'"

# Published settings: batch 1 with 4 micro-batches per update, lr 1e-4 constant (the trainer's defaults), a
# checkpoint every 250 steps, bf16. The backbone's own defaults (model id, resolution, run root, run-name layout)
# are filled by the trainer from the backbone class, their one owner; MODEL_NAME, RESOLUTION and OUTPUT_DIR
# are passed only when set, CONFIG as below.
# Published defaults: a style image (trigger <s>) and a content subject (trigger <c>) from assets/.
case "$TASK" in
  sty) DEFAULT_INSTANCE_DIR="$REPO_ROOT/assets/sty/swirl_painting"; TRIGGER="s"
       PROMPT="a landscape in <s> style"; VALIDATION="a cat in <s> style" ;;
  cnt) DEFAULT_INSTANCE_DIR="$REPO_ROOT/assets/cnt/cat"; TRIGGER="c"
       PROMPT="a photo of a <c> cat"; VALIDATION="a photo of a <c> cat on the beach" ;;
  *) die "unknown TASK '$TASK'" ;;
esac

INSTANCE_DIR="${INSTANCE_DIR:-$DEFAULT_INSTANCE_DIR}"
MAX_TRAIN_STEPS="${MAX_TRAIN_STEPS:-${DEFAULT_STEPS:-1000}}"
MIXED_PRECISION="${MIXED_PRECISION:-bf16}"
OPTIONAL=()
if [[ -n "${MODEL_NAME:-}" ]]; then OPTIONAL+=(--pretrained_model_name_or_path "$MODEL_NAME"); fi
if [[ -n "${RESOLUTION:-}" ]]; then OPTIONAL+=(--resolution "$RESOLUTION"); fi
# The run folder: OUTPUT_DIR, else <the backbone's run root>/<date-time>-<trigger>-<rank>-p<pid>[-<method>] (the
# trainer appends the method where the backbone's published layout has it). The launching shell's pid makes the
# name unique: a sweep that starts two runs in one second gets two folders.
if [[ -n "${OUTPUT_DIR:-}" ]]; then
  OPTIONAL+=(--output_dir "$OUTPUT_DIR")
else
  OPTIONAL+=(--run_name "$(date +%Y%m%d-%H%M%S)-${TRIGGER}-${RANK_ARG}-p$$")
fi

# The trainer creates OUTPUT_DIR and copies this wrapper into it (so the run folder keeps what launched it)
# only after every input checked out: a typo never leaves an empty run folder behind.
export QRLORA_LAUNCHER="$WRAPPER"

# One process: run the trainer directly (accelerate needs no launcher for it, and user errors stay one line).
# Several: accelerate's launcher starts one data-parallel process per GPU id.
LAUNCH=(python)
if (( NUM_PROCESSES > 1 )); then
  LAUNCH=(python -m accelerate.commands.launch "${ACCELERATE_DEVICE_FLAGS[@]}" --num_processes "$NUM_PROCESSES"
          --num_machines 1 --mixed_precision "$MIXED_PRECISION" --dynamo_backend no)
fi
# The wrapper's published defaults; with CONFIG=run.toml (or .yaml) the file's settings stand in their place
# (the backbone, method, rank and run folder stay the wrapper's), and flags after RANK override the file.
DATA=(--instance_data_dir "$INSTANCE_DIR")
if [[ -n "${DATASET_NAME:-}" ]]; then DATA=(--dataset_name "$DATASET_NAME"); fi  # a datasets dataset instead
PUBLISHED=("${DATA[@]}" --instance_prompt "$PROMPT" --validation_prompt "$VALIDATION"
           --gradient_accumulation_steps 4 --max_train_steps "$MAX_TRAIN_STEPS" --checkpointing_steps 250
           --validation_epochs 250 --mixed_precision "$MIXED_PRECISION")
if [[ -n "${CONFIG:-}" ]]; then
  PUBLISHED=(--config "$CONFIG")
fi
COMMAND=("${LAUNCH[@]}" -m qrlora.train \
  --backbone "$BACKBONE" \
  --rank "$RANK_ARG" \
  --lora_init_method "$METHOD" \
  "${PUBLISHED[@]}" \
  "${OPTIONAL[@]}" \
  ${METHOD_FLAGS:-} \
  "$@")

# DRY_RUN=1 prints the command the wrapper would run (defaults resolved) and changes nothing.
run_command "${COMMAND[@]}"
