# Shared by every wrapper (sourced, not run): GPU selection and the repository root.
# GPU_IDS: "0", "0,1,..." (one process per id) or "cpu".

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

die() { echo "error: $*" >&2; exit 2; }

# select_devices GPU_IDS: sets CUDA_VISIBLE_DEVICES, NUM_PROCESSES and ACCELERATE_DEVICE_FLAGS.
select_devices() {
  local ids="${1:-}"
  [[ -n "$ids" ]] || die "first argument must be GPU ids (0 or 0,1,...) or cpu"
  if [[ "$ids" == "cpu" ]]; then
    export CUDA_VISIBLE_DEVICES=""
    NUM_PROCESSES=1
    ACCELERATE_DEVICE_FLAGS=(--cpu)
  elif [[ "$ids" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    export CUDA_VISIBLE_DEVICES="$ids"
    NUM_PROCESSES=$(( $(tr -cd ',' <<<"$ids" | wc -c) + 1 ))
    ACCELERATE_DEVICE_FLAGS=()
    (( NUM_PROCESSES > 1 )) && ACCELERATE_DEVICE_FLAGS=(--multi_gpu)
  else
    die "GPU ids must look like 0 or 0,1 or cpu, got '$ids'"
  fi
}
