# Sourced by bench/gpu_check.sh and bench/gpu_flux.sh (not run on its own): the pins of bench/gpu_wheels.txt that the
# Python "$python" lacks (or has at another version), installed from bench/gpu_wheels/ with no network into a folder
# of their own that goes first on PYTHONPATH, so the GPU image's own packages stay as they are. A no-op where every
# pin is there (CI, a user's own environment). Needs "$python" and "$here" (the bench folder) set; exits 2 with one
# line when a pin is missing and no wheels were prepared (bash bench/prepare_gpu_wheels.sh).
gpu_site_missing="$("$python" - "$here/gpu_wheels.txt" <<'PY'
import importlib.metadata as metadata, sys
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        try:
            present = metadata.version(name)
        except metadata.PackageNotFoundError:
            present = None
        if present != version:
            print(f"{name}=={version}")
PY
)"
if [ -n "$gpu_site_missing" ]; then
    gpu_site="${TMPDIR:-/tmp}/qrlora_gpu_site"
    gpu_site_wheels=("$here"/gpu_wheels/*.whl)
    if [ ! -e "${gpu_site_wheels[0]}" ]; then
        echo "bench: this Python lacks $(echo $gpu_site_missing) and bench/gpu_wheels/ has no wheels: run bash bench/prepare_gpu_wheels.sh where the package index is reachable, and bring bench/gpu_wheels along" >&2
        exit 2
    fi
    "$python" -m pip install --quiet --root-user-action=ignore --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$gpu_site" \
        "${gpu_site_wheels[@]}"
    export PYTHONPATH="$gpu_site${PYTHONPATH:+:$PYTHONPATH}"
    echo "bench: installed $(echo $gpu_site_missing) from bench/gpu_wheels/ into $gpu_site"
fi
