#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs that a bare GPU image (torch, transformers, accelerate, peft) lacks, downloaded
# here into bench/gpu_wheels/ (git-ignored) so the GPU machine installs them with no network:
#
#   bash bench/prepare_gpu_wheels.sh          # on a machine with the package index (a few MB)
#   (then carry bench/gpu_wheels to the GPU machine; gpu_check.sh installs from it with pip --no-index)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="$here/gpu_wheels"
mkdir -p "$dest"
# diffusers and what it imports beyond a torch + transformers image; no torch (the image's CUDA build stays).
python -m pip download --quiet --only-binary=:all: --python-version 3.10 --dest "$dest" --no-deps \
    diffusers==0.42.1 sentencepiece==0.2.3 importlib_metadata zipp regex
ls "$dest"
