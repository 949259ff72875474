"""The published workflow as a user types it, and the run discovery that lets it work without paths.

    cd flux_dir
    bash train_deltaR_sty.sh 0 64
    bash train_deltaR_cnt.sh 0 64
    bash inference_merge.sh 0
    cd ../test && bash visualize_qrlora_similarity.sh 0

On the tiny FLUX pipeline: the two trainings get it through MODEL_NAME (the only environment variable, since the
published default is the FLUX.1-dev hub id) and small-run flags after the GPU and rank; every later command runs
with no environment variable at all and finds the runs, and the base model they recorded, by itself.
"""
import os
import shlex
import shutil
import subprocess
import time

import pytest
import torch
from conftest import REPO, error_lines
from safetensors.torch import save_file

from qrlora.cli.runs import main
from qrlora.files.runs import find_runs, newest_pair

pytestmark = pytest.mark.slow  # minutes of training or rendering: left out of `pytest -m "not slow"`

SMALL_RUN = ["--max_train_steps", "2", "--resolution", "64", "--mixed_precision", "no", "--max_sequence_length", "16",
             "--validation_inference_steps", "2", "--num_validation_images", "1"]
USER_VARIABLES = ("MODEL_NAME", "STYLE_LORA", "CONTENT_LORA", "LORA1_PATH", "LORA2_PATH", "LORA_PATH", "MODEL_PATH",
                  "OUTPUT_DIR", "MAX_TRAIN_STEPS", "RESOLUTION", "MIXED_PRECISION", "INSTANCE_DIR")


def checkout(tmp_path):
    """A copy of the repository's wrappers (code and sample images linked), so runs land in the copy, not the repo."""
    root = tmp_path / "QR-LoRA"
    for folder in ("flux_dir", "scripts", "test"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "exps_*", "output*"))
    for folder in ("qrlora", "assets"):
        (root / folder).symlink_to(REPO / folder)
    return root


def user(cwd, *command, **variables):
    """Run ``command`` in ``cwd`` the way a user's shell would: only the environment variables they typed."""
    env = {k: v for k, v in os.environ.items() if k not in USER_VARIABLES}
    return subprocess.run(list(command), cwd=cwd, env={**env, **variables}, capture_output=True, text=True)


def test_published_workflow_needs_no_paths(tiny_flux, tmp_path):
    root = checkout(tmp_path)
    flux_dir = root / "flux_dir"

    nothing = user(flux_dir, "bash", "inference_merge.sh", "cpu")  # before any training: one line, what to set
    assert nothing.returncode == 2 and len(error_lines(nothing.stderr)) == 1
    assert "set STYLE_LORA and CONTENT_LORA" in nothing.stderr and "flux_dir/train_deltaR_sty.sh" in nothing.stderr
    for wrapper, what in (("visualize_qrlora_similarity.sh", "set LORA1_PATH and LORA2_PATH"),
                          ("analyze_moe_experts.sh", "set LORA_PATH to a MoE adapter file")):
        nothing = user(root / "test", "bash", wrapper, "cpu")
        assert nothing.returncode == 2 and len(error_lines(nothing.stderr)) == 1 and what in nothing.stderr

    for wrapper in ("train_deltaR_sty.sh", "train_deltaR_cnt.sh"):
        trained = user(flux_dir, "bash", wrapper, "cpu", "4", *SMALL_RUN, MODEL_NAME=str(tiny_flux))
        assert trained.returncode == 0, trained.stderr[-3000:]
    runs = sorted((p.name for p in (flux_dir / "exps_flux").iterdir()), key=lambda name: "-s-4-" in name)
    assert len(runs) == 2 and "-c-4-" in runs[0] and "-s-4-" in runs[1]  # [content, style]
    assert all((flux_dir / "exps_flux" / r / "README.md").is_file() for r in runs)  # model card beside each adapter
    assert (flux_dir / "exps_flux" / runs[0] / "train_deltaR_cnt.sh").is_file()  # the run keeps what launched it
    assert (flux_dir / "exps_flux" / runs[1] / "train_deltaR_sty.sh").is_file()

    merged = user(flux_dir, "bash", "inference_merge.sh", "cpu", "--num_inference_steps", "2", "--height", "64",
                  "--width", "64", "--max_sequence_length", "16")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert f"exps_flux/{runs[1]} (style, flux triu_deltaR rank 4)" in merged.stderr
    assert f"exps_flux/{runs[0]} (content, flux triu_deltaR rank 4)" in merged.stderr
    assert f"model:       {tiny_flux}" in merged.stderr
    assert (flux_dir / "outputs_flux" / "merge" / "grid.png").is_file()

    compared = user(root / "test", "bash", "visualize_qrlora_similarity.sh", "cpu")
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert f"{runs[1]} (style" in compared.stderr and f"{runs[0]} (content" in compared.stderr
    (result,) = (root / "test" / "output_vis").glob("qrlora_sim-*")
    assert (result / "all_statistics_summary.json").is_file()


# ---- run discovery ------------------------------------------------------------------------------------------
def fake_run(root, exp, name, method="triu_deltaR", rank=4, backbone="flux", base="base", age=0.0, wrapper=None):
    """A finished run folder: an adapter file whose metadata is all discovery reads, modified ``age`` s ago."""
    folder = root / exp / name
    folder.mkdir(parents=True)
    path = folder / "pytorch_lora_weights.safetensors"
    save_file({"transformer.x.lora.q.weight": torch.zeros(1)}, str(path),
              metadata={"format": "qrlora", "method": method, "rank": str(rank), "backbone": backbone, "base_model": base})
    if wrapper:
        (folder / wrapper).write_text("#!/usr/bin/env bash\n")
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return folder


def test_newest_pair_of_one_backbone_method_and_rank(tmp_path):
    fake_run(tmp_path, "exps_flux", "20260101-000000-s-4", age=50)
    newest_style = fake_run(tmp_path, "exps_flux", "20260102-000000-s-4", age=40)
    content = fake_run(tmp_path, "exps_flux", "20260102-000001-c-4", age=30)
    fake_run(tmp_path, "exps_flux", "20260103-000000-c-8", rank=8, age=1)  # newest, but no rank-8 style run
    fake_run(tmp_path, "exps_flux", "my-own-name", age=0)  # task unknown: skipped
    renamed = fake_run(tmp_path, "exps_SD3", "style", backbone="sd3", method="svd", age=60, wrapper="train_svd_sty.sh")
    style, cnt = newest_pair(find_runs([tmp_path]))
    assert (style.folder, cnt.folder) == (newest_style, content)
    assert {r.folder.name for r in find_runs([tmp_path])} >= {renamed.name}  # task from the wrapper copy


def test_discovery_filters_and_errors(tmp_path, capsys):
    style = fake_run(tmp_path, "exps_SD3", "20260101-000000-s-8-moe", method="moe", rank=8, backbone="sd3", age=10,
                     base="tiny-sd3")
    fake_run(tmp_path, "exps_SD3", "20260101-000001-c-8-moe", method="moe", rank=8, backbone="sd3", age=5,
             base="tiny-sd3")
    (tmp_path / "tiny-sd3").mkdir()  # a base model recorded as a path relative to where training started
    main(["latest", "--roots", str(tmp_path), "--methods", "moe"])  # analyze_moe_experts.sh: the style run first
    assert capsys.readouterr().out.splitlines() == [f"FOUND_LORA={style / 'pytorch_lora_weights.safetensors'}",
                                                    f"FOUND_MODEL={tmp_path / 'tiny-sd3'}"]
    main(["pair", "--roots", str(tmp_path), "--backbone", "sd3", "--methods", "moe"])
    out = capsys.readouterr()
    assert "FOUND_STYLE_LORA=" in out.out and "-s-8-moe (style, sd3 moe rank 8)" in out.err
    with pytest.raises(SystemExit):
        main(["pair", "--roots", str(tmp_path), "--static", "--hint", "set STYLE_LORA"])  # moe never folds
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no finished style + content pair") and err[0].endswith("set STYLE_LORA")


def test_wrapper_typo_leaves_no_run_folder_and_each_launch_gets_its_own(tiny_flux, tmp_path):
    """The trainer, not the wrapper, creates the run folder, after every input checked out; launches never share one."""
    flux_dir = checkout(tmp_path) / "flux_dir"
    typo = user(flux_dir, "bash", "train_deltaR_sty.sh", "cpu", "4", *SMALL_RUN, "--learning_rate", "nan",
                MODEL_NAME=str(tiny_flux))
    assert typo.returncode == 2 and len(error_lines(typo.stderr)) == 1 and "--learning_rate" in typo.stderr
    exps = flux_dir / "exps_flux"
    assert not exps.exists() or not any(exps.iterdir()), list(exps.iterdir())

    def planned_output_dir():  # DRY_RUN=1: the command the wrapper would run, nothing created
        command = user(flux_dir, "bash", "train_deltaR_sty.sh", "cpu", "4", DRY_RUN="1", MODEL_NAME=str(tiny_flux))
        assert command.returncode == 0, command.stderr
        from qrlora.cli.train import parse_args

        return parse_args(shlex.split(command.stdout)[3:]).output_dir
    first, second = planned_output_dir(), planned_output_dir()  # a sweep starting two runs within one second
    assert first != second and first.startswith("exps_flux/") and second.startswith("exps_flux/")
