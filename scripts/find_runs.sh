# Run discovery for the merge and analysis wrappers (sourced after common.sh): the newest runs that the
# training wrappers wrote under exps_*/ in the current folder, the repository root or flux_dir/ SD3_dir/ SDXL_dir/.
# The choice is printed on stderr; when nothing fits, one error line says what to set (python -m qrlora.runs).

RUN_ROOTS=("$PWD" "$REPO_ROOT" "$REPO_ROOT/flux_dir" "$REPO_ROOT/SD3_dir" "$REPO_ROOT/SDXL_dir")

# find_pair HINT [filter flags of `python -m qrlora.runs`]: sets FOUND_STYLE_LORA, FOUND_CONTENT_LORA, FOUND_MODEL.
find_pair() {
  local hint="$1" found; shift
  found="$("${PYTHON:-python}" -m qrlora.runs pair --roots "${RUN_ROOTS[@]}" --hint "$hint" "$@")" || exit 2
  eval "$found"
}

# find_latest HINT [filter flags]: sets FOUND_LORA and FOUND_MODEL (the newest style run, else the newest run).
find_latest() {
  local hint="$1" found; shift
  found="$("${PYTHON:-python}" -m qrlora.runs latest --roots "${RUN_ROOTS[@]}" --hint "$hint" "$@")" || exit 2
  eval "$found"
}
