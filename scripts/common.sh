# Shared by every wrapper (sourced, not run): GPU selection and the repository root.
# GPU_IDS: "0", "0,1,..." (one process per id) or "cpu".

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

die() { echo "error: $*" >&2; exit 2; }

# No wrapper exits non-zero in silence: a failing command that did not say why itself gets one line naming the
# wrapper, the line and the command (set -e would otherwise end the wrapper with no output at all).
set -E
trap 'status=$?; echo "error: ${BASH_SOURCE[0]#"$REPO_ROOT"/}:${LINENO}: \`${BASH_COMMAND}\` failed (exit ${status})" >&2' ERR

# select_devices GPU_IDS: sets CUDA_VISIBLE_DEVICES, NUM_PROCESSES and ACCELERATE_DEVICE_FLAGS.
select_devices() {
  local ids="${1:-}"
  [[ -n "$ids" ]] || die "first argument must be GPU ids (0 or 0,1,...) or cpu"
  if [[ "$ids" == "cpu" ]]; then
    export CUDA_VISIBLE_DEVICES=""
    NUM_PROCESSES=1
    ACCELERATE_DEVICE_FLAGS=(--cpu)
    DEVICE_SUMMARY="cpu (1 process)"
  elif [[ "$ids" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
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
# replaces the shell with it; with DRY_RUN=1 prints the command on stdout (defaults resolved) and changes nothing.
run_command() {
  echo "devices: ${DEVICE_SUMMARY:-not selected}" >&2
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"; echo
    exit 0
  fi
  { printf 'command:'; printf ' %q' "$@"; echo; } >&2
  exec "$@"
}
