"""Every wrapper accepts one GPU id, several GPU ids and `cpu`, prints the devices it chose and its command, and
never exits non-zero in silence (issue 22: `(( N > 1 )) && ...` under `set -e` ended every one-GPU launch).

DRY_RUN=1 throughout: the work itself needs a GPU for the GPU ids, the device selection and the command do not.
"""
import os
import subprocess

import pytest
from conftest import REPO

TRAIN = ["SD3_dir/train_deltaR_sty.sh", "SD3_dir/train_deltaR_cnt.sh", "SD3_dir/train_svd_sty.sh",
         "SD3_dir/train_ica_cnt.sh", "SD3_dir/train_moe_sty.sh", "flux_dir/train_deltaR_sty.sh",
         "flux_dir/train_QR.sh", "SDXL_dir/train_deltaR_cnt.sh"]
MERGE = ["SD3_dir/inference.sh", "SD3_dir/inference_ica.sh", "SD3_dir/inference_MoE.sh", "flux_dir/inference_merge.sh",
         "SDXL_dir/inference_merge.sh"]
ANALYSIS = ["test/visualize_qrlora_similarity.sh", "test/analyze_moe_experts.sh", "test/evaluate_merge.sh"]
RESIDUAL = ["flux_dir/save_flux_residual.sh"]
DEVICES = {"0": "CUDA_VISIBLE_DEVICES=0 (1 process)", "0,1": "CUDA_VISIBLE_DEVICES=0,1 (2 processes)",
           "cpu": "cpu (1 process)"}


def run(wrapper, *args, cwd, **env):
    full_env = {**os.environ, "DRY_RUN": "1", "STYLE_LORA": "style.safetensors", "CONTENT_LORA": "content.safetensors",
                "LORA1_PATH": "a.safetensors", "LORA2_PATH": "b.safetensors", "LORA_PATH": "moe.safetensors",
                "MODEL_NAME": "some/model", "IMAGES": "grid", **env}
    return subprocess.run(["bash", str(REPO / wrapper), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("ids", list(DEVICES))
@pytest.mark.parametrize("wrapper", TRAIN + MERGE + ANALYSIS + RESIDUAL)
def test_wrapper_takes_one_gpu_several_gpus_and_cpu(wrapper, ids, tmp_path):
    args = [ids, "64"] if wrapper in TRAIN else [ids]
    done = run(wrapper, *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"devices: {DEVICES[ids]}" in done.stderr
    command = done.stdout.strip().splitlines()[-1]
    assert "python" in command
    if wrapper in TRAIN:
        assert "--rank 64" in command
        assert ("--multi_gpu --num_processes 2" in command) == (ids == "0,1")
    assert list(tmp_path.iterdir()) == []  # a dry run creates nothing


def test_bad_gpu_ids_are_one_line(tmp_path):
    done = run("SD3_dir/train_deltaR_sty.sh", "gpu0", "64", cwd=tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == ["error: GPU ids must look like 0 or 0,1 or cpu, got 'gpu0'"]


def test_a_failing_step_is_never_silent(tmp_path):
    """Any command that fails under set -e without saying why gets one line naming the script, line and command."""
    script = tmp_path / "wrapper.sh"
    script.write_text(f'set -euo pipefail\nsource "{REPO}/scripts/common.sh"\nselect_devices cpu\nfalse\necho unreachable\n')
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "wrapper.sh:4" in lines[0] and "`false` failed (exit 1)" in lines[0], lines
