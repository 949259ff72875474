# Shared by every wrapper (sourced, not run): GPU selection and the repository root.
# GPU_IDS: "0", "0,1,..." (one process per id) or "cpu".

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

die() { echo "error: $*" >&2; exit 2; }

# No wrapper exits non-zero in silence: a failing command that did not say why itself gets one line naming the
# wrapper, the line and the command (set -e would otherwise end the wrapper with no output at all).
set -E
trap 'status=$?; echo "error: ${BASH_SOURCE[0]#"$REPO_ROOT"/}:${LINENO}: \`${BASH_COMMAND}\` failed (exit ${status})" >&2' ERR

# is_dry_run: DRY_RUN set to 1 / true / yes / on (any case) is a dry run; unset, empty, 0 / false / no / off is a
# real one; anything else is refused (DRY_RUN=true used to train for real: only `1` was dry, issue 30).
is_dry_run() {
  case "${DRY_RUN:-0}" in
    1|[Tt][Rr][Uu][Ee]|[Yy][Ee][Ss]|[Oo][Nn]) return 0 ;;
    ""|0|[Ff][Aa][Ll][Ss][Ee]|[Nn][Oo]|[Oo][Ff][Ff]) return 1 ;;
    *) die "DRY_RUN must be 1, true, yes or on (a dry run) or 0, false, no or off, got '${DRY_RUN}'" ;;
  esac
}

# cuda_gpu_count: the CUDA GPUs this machine has (nvidia-smi, else the driver's /proc entries; 0 without a driver).
# Read without importing torch, so a wrapper still starts in a fraction of a second.
cuda_gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
  elif [[ -d /proc/driver/nvidia/gpus ]]; then
    find /proc/driver/nvidia/gpus -mindepth 1 -maxdepth 1 | wc -l
  else
    echo 0
  fi
}

# check_gpu_ids IDS: no id twice (`0,0` is not two GPUs), and ids this machine has. A GPU id on a machine without
# CUDA would train on the CPU while saying CUDA_VISIBLE_DEVICES=0: refused, or said in one line on a dry run.
check_gpu_ids() {
  local ids="$1" id count seen=","
  for id in ${ids//,/ }; do
    [[ "$seen" != *",$id,"* ]] || die "GPU ids '$ids' name GPU $id twice; give each GPU once (0,1 is two processes)"
    seen+="$id,"
  done
  count=$(cuda_gpu_count)
  local problem=""
  if (( count == 0 )); then
    problem="GPU ids '$ids': this machine has no CUDA GPU (no NVIDIA driver found); pass cpu to run on the CPU"
  else
    for id in ${ids//,/ }; do
      if (( 10#$id >= count )); then
        problem="GPU id $id: this machine has $count CUDA GPU(s), ids 0 to $(( count - 1 ))"
        break
      fi
    done
  fi
  if [[ -n "$problem" ]]; then
    if is_dry_run; then
      echo "note: $problem (a real run is refused)" >&2
    else
      die "$problem"
    fi
  fi
}

# select_devices GPU_IDS: sets CUDA_VISIBLE_DEVICES, NUM_PROCESSES and ACCELERATE_DEVICE_FLAGS.
select_devices() {
  is_dry_run || true  # a DRY_RUN that is neither yes nor no is refused before anything runs
  local ids="${1:-}"
  [[ -n "$ids" ]] || die "first argument must be GPU ids (0 or 0,1,...) or cpu"
  if [[ "$ids" == "cpu" ]]; then
    export CUDA_VISIBLE_DEVICES=""
    NUM_PROCESSES=1
    ACCELERATE_DEVICE_FLAGS=(--cpu)
    DEVICE_SUMMARY="cpu (1 process)"
  elif [[ "$ids" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    check_gpu_ids "$ids"
    export CUDA_VISIBLE_DEVICES="$ids"
    NUM_PROCESSES=$(( $(tr -cd ',' <<<"$ids" | wc -c) + 1 ))
    ACCELERATE_DEVICE_FLAGS=()
    # An `if`, not `(( ... )) && ...`: with one GPU the arithmetic test is false, the line's status is 1, and
    # under set -e that silently ended every wrapper given a single GPU id.
    if (( NUM_PROCESSES > 1 )); then
      ACCELERATE_DEVICE_FLAGS=(--multi_gpu)
    fi
    DEVICE_SUMMARY="CUDA_VISIBLE_DEVICES=$ids ($NUM_PROCESSES process$( (( NUM_PROCESSES > 1 )) && echo es || true))"
  else
    die "GPU ids must look like 0 or 0,1 or cpu, got '$ids'"
  fi
}

# run_command CMD...: the one way a wrapper starts its work. Prints the devices and the command on stderr, then
# replaces the shell with it; with DRY_RUN=1 (true, yes, on) prints the command on stdout (defaults resolved) and
# changes nothing.
run_command() {
  is_dry_run || true  # a DRY_RUN that is neither yes nor no stops here, before anything runs
  echo "devices: ${DEVICE_SUMMARY:-not selected}" >&2
  if is_dry_run; then
    printf '%q ' "$@"; echo
    exit 0
  fi
  { printf 'command:'; printf ' %q' "$@"; echo; } >&2
  exec "$@"
}
