#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs that the GPU image lacks (the pins in bench/gpu_wheels.txt), downloaded here
# into bench/gpu_wheels/ (git-ignored) so the GPU machine installs them with no network:
#
#   bash bench/prepare_gpu_wheels.sh          # on a machine with the package index (about 5 MB)
#   (then carry bench/gpu_wheels to the GPU machine; gpu_check.sh installs them with pip --no-index --no-deps)
#
# For the image's CPython 3.12 on x86-64 Linux, whatever this machine runs; no torch (the image's CUDA build stays).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="$here/gpu_wheels"
python="${PYTHON:-$(command -v python3 || command -v python)}"
rm -rf "$dest"  # one version of each: two of one package stop the whole install there
mkdir -p "$dest"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --dest "$dest" -r "$here/gpu_wheels.txt"
ls "$dest"
