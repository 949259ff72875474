"""The one trainer through the real SD3 and FLUX wrappers on tiny pipelines; resume, two processes, bad input."""
from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import REPO, error_lines, free_port, one_error, run_script
from qrlora.files.checkpoint import ADAPTER_FILENAME, load_adapter
from qrlora.core.methods import get_method

FAST = ["--validation_inference_steps", "1", "--num_validation_images", "1"]
SD3_WRAPPERS = {
    "train_deltaR_sty.sh": "triu_deltaR", "train_deltaR_cnt.sh": "triu_deltaR",
    "train_ica_sty.sh": "ica", "train_ica_cnt.sh": "ica",
    "train_svd_sty.sh": "svd", "train_svd_cnt.sh": "svd",
    "train_moe_sty.sh": "moe", "train_moe_cnt.sh": "moe",
}
FLUX_WRAPPERS = {
    "train_deltaR_sty.sh": "triu_deltaR", "train_deltaR_cnt.sh": "triu_deltaR",
    "train_QR.sh": "qr", "train_QR_sty.sh": "qr", "train_QR_cnt.sh": "qr",
}


def one_fast(scripts, quick):
    """The wrappers as parameters: ``quick`` stays in the quick subset, every other one is marked slow (the full
    suite runs them all)."""
    return [pytest.param(s, marks=() if s == quick else pytest.mark.slow) for s in scripts]


def run_wrapper(folder, script, model, out, rank, extra=()):
    env = {"MODEL_NAME": str(model), "OUTPUT_DIR": str(out), "MAX_TRAIN_STEPS": "2", "RESOLUTION": "64"}
    return run_script(["bash", f"{folder}/{script}", "cpu", str(rank), *FAST, *extra], env=env)


def check_adapter_file(path, model_dir, method, rank, backbone, component="transformer"):
    """Keys, shapes, metadata; coefficients trained; frozen tensors equal a fresh decomposition of the base."""
    adapter = load_adapter(path)
    meta = adapter.metadata
    assert meta["format"] == "qrlora" and meta["method"] == method and meta["backbone"] == backbone
    assert int(meta["rank"]) == rank and meta["base_model"] == str(model_dir) and json.loads(meta["target_modules"])
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith(component + ".") for k in f.keys())
    denoiser_cls = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}[backbone]
    import diffusers

    base = getattr(diffusers, denoiser_cls).from_pretrained(model_dir, subfolder=component)
    m = get_method(method)
    trained = False
    for layer_path, tensors in adapter.layers.items():
        weight = base.get_submodule(layer_path).weight
        fresh = m.initialize(weight, adapter.config, layer_path)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in fresh.items()}
        for name in m.basis:
            assert torch.equal(tensors[name], fresh[name]), f"{layer_path}.{name} changed"
        for name in m.trainable:
            trained |= not torch.equal(tensors[name], fresh[name])
        if method == "triu_deltaR":
            assert torch.count_nonzero(torch.tril(tensors["delta_r"], diagonal=-1)) == 0
    assert trained, "no trainable tensor changed"
    return adapter


@pytest.mark.parametrize("script", one_fast(SD3_WRAPPERS, "train_deltaR_sty.sh"))
def test_sd3_wrappers_end_to_end(tiny_sd3, tmp_path, script):
    method = SD3_WRAPPERS[script]
    rank = 8 if method == "moe" else 4
    out = tmp_path / "run"
    run_wrapper("SD3_dir", script, tiny_sd3, out, rank)
    check_adapter_file(out / ADAPTER_FILENAME, tiny_sd3, method, rank, "sd3")
    assert (out / script).read_text() == (REPO / "SD3_dir" / script).read_text()
    assert list((out / "validation").glob("*.png"))


@pytest.mark.parametrize("script", one_fast(FLUX_WRAPPERS, "train_QR.sh"))
def test_flux_wrappers_end_to_end(tiny_flux, tmp_path, script):
    method = FLUX_WRAPPERS[script]
    out = tmp_path / "run"
    run_wrapper("flux_dir", script, tiny_flux, out, 4, ["--max_sequence_length", "16"])
    adapter = check_adapter_file(out / ADAPTER_FILENAME, tiny_flux, method, 4, "flux")
    assert any(p.startswith("single_transformer_blocks.") for p in adapter.layers)  # single blocks adapted too
    if method == "qr":
        from qrlora.files.export import lora_export_tensors

        exported = lora_export_tensors(adapter)
        assert all(v.shape[0] == 8 for k, v in exported.items() if k.endswith("lora_A.weight"))  # rank 2r


@pytest.mark.parametrize("method", ["deltaR", "svd", "ica", "moe", "lora"])
def test_every_method_trains_on_flux(tiny_flux, tmp_path, method):
    from qrlora.cli.train import main

    rank = 8 if method == "moe" else 4
    final = main(["--pretrained_model_name_or_path", str(tiny_flux), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
                  "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", "1",
                  "--max_sequence_length", "16", "--output_dir", str(tmp_path), "--lora_init_method", method,
                  "--rank", str(rank), "--moe_num_experts", "4"])
    check_adapter_file(final, tiny_flux, method, rank, "flux")


def test_flux_memory_options(tiny_flux, tmp_path):
    """bf16 base, bf16 autocast, gradient checkpointing and cached latents together; the base really is bf16."""
    from qrlora.training import trainer as train
    from qrlora.cli.train import main

    seen = {}
    original = train.cast_base_model_

    def spy(model, dtype):
        seen["dtype"] = dtype
        return original(model, dtype)

    train.cast_base_model_ = spy
    try:
        final = main(["--pretrained_model_name_or_path", str(tiny_flux), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
                      "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", "2",
                      "--max_sequence_length", "16", "--output_dir", str(tmp_path), "--base_precision", "bf16",
                      "--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_latents",
                      "--lora_init_method", "triu_deltaR"])
    finally:
        train.cast_base_model_ = original
    assert seen["dtype"] == torch.bfloat16
    adapter = load_adapter(final)
    assert all(t.dtype == torch.float32 for named in adapter.layers.values() for t in named.values())
    assert any(torch.count_nonzero(named["delta_r"]) for named in adapter.layers.values())


def train_args(model, out, steps, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
            "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", str(steps),
            "--output_dir", str(out), "--lora_init_method", "triu_deltaR", "--checkpointing_steps", "2",
            "--random_flip", *extra]


def test_resume_continues_exactly(tiny_sd3, tmp_path):
    from qrlora.cli.train import main

    straight = main(train_args(tiny_sd3, tmp_path / "a", 4))
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = main(train_args(tiny_sd3, resumed_dir, 4, "--resume_from_checkpoint", "latest"))
    a, b = load_adapter(straight), load_adapter(resumed)
    for path, tensors in a.layers.items():
        assert torch.equal(tensors["delta_r"], b.layers[path]["delta_r"]), path
    assert not torch.equal(load_adapter(tmp_path / "a" / "checkpoint-2" / ADAPTER_FILENAME).layers[path]["delta_r"], tensors["delta_r"])


@pytest.mark.slow
def test_two_processes_on_cpu(tiny_sd3, tmp_path):
    """``accelerate launch --cpu --num_processes 2``: validation on the main process changes nothing the run trains.

    accelerate 1.15 starts one process for this launch on a machine without mpirun, so this is the launcher's path,
    not two processes; the real two-process data-parallel run over gloo is test_fsdp.py's unsharded comparison
    (``test_sharded_training_on_two_cpu_processes``: one writer, identical adapters on both ranks)."""
    def launch(out, *extra):
        run_script([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                    "--main_process_port", str(free_port()),
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "qrlora.train",
                    *train_args(tiny_sd3, out, 4), "--lora_init_method", "ica", "--checkpointing_steps", "100", *extra])
        return out / ADAPTER_FILENAME

    plain = launch(tmp_path / "ddp")
    files = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert files == ["README.md", "config.toml", "dataset.json", ADAPTER_FILENAME]  # one writer (adapter, card, settings, data record), no stray temporary files
    check_adapter_file(plain, tiny_sd3, "ica", 4, "sd3")
    validated = launch(tmp_path / "ddp_validated", "--validation_prompt", "a <c> cat", "--validation_epochs", "1",
                       "--num_validation_images", "1", "--validation_inference_steps", "2")
    a, b = load_adapter(plain), load_adapter(validated)
    assert all(torch.equal(t, b.layers[p][n]) for p, named in a.layers.items() for n, t in named.items())


# ---- bad input: one clear line, non-zero exit, nothing overwritten -----------------------------------
def test_wrong_backbone_for_wrapper(tiny_sd3, tiny_flux, tmp_path):
    for folder, model, found in (("flux_dir", tiny_sd3, "sd3"), ("SD3_dir", tiny_flux, "flux")):
        env = {"MODEL_NAME": str(model), "OUTPUT_DIR": str(tmp_path / folder), "MAX_TRAIN_STEPS": "1", "RESOLUTION": "64"}
        proc = run_script(["bash", f"{folder}/train_deltaR_sty.sh", "cpu", "4"], env=env, check=False)
        assert proc.returncode != 0
        errors = error_lines(proc.stderr)
        assert len(errors) == 1 and f"a {found} pipeline" in errors[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["missing_model", "not_a_pipeline", "missing_instance", "empty_instance",
                                  "unreadable_only", "bad_rank", "rank_too_big", "existing_run", "nf4_unavailable", "prodigy_missing"])
def test_bad_input_is_one_line(tiny_sd3, tmp_path, case, capsys):
    """One ``error:`` line naming the fault, a non-zero exit, no traceback, nothing overwritten. The first case goes
    through ``python -m qrlora.train`` in a fresh process (the real entry); the others call the same ``main``."""
    args = train_args(tiny_sd3, tmp_path / "out", 1)

    def set_flag(flag, value):
        args[args.index(flag) + 1] = value
    expect = {"missing_model": "cannot find", "not_a_pipeline": "model_index.json", "missing_instance": "does not exist",
              "empty_instance": "is empty", "unreadable_only": "no readable image", "bad_rank": "--rank",
              "rank_too_big": "exceeds", "existing_run": "already holds",
              "nf4_unavailable": "--base_precision nf4 needs", "prodigy_missing": "prodigyopt"}[case]
    if case == "missing_model":
        set_flag("--pretrained_model_name_or_path", str(tmp_path / "nope"))
    elif case == "not_a_pipeline":
        set_flag("--pretrained_model_name_or_path", str(tmp_path))
    elif case == "missing_instance":
        set_flag("--instance_data_dir", str(tmp_path / "nope"))
    elif case == "empty_instance":
        (tmp_path / "empty").mkdir()
        set_flag("--instance_data_dir", str(tmp_path / "empty"))
    elif case == "unreadable_only":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
        set_flag("--instance_data_dir", str(tmp_path / "bad"))
    elif case == "bad_rank":
        args += ["--rank", "0"]
    elif case == "rank_too_big":
        args += ["--rank", "64"]
    elif case == "nf4_unavailable":
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is present: nf4 may work here")
        args += ["--base_precision", "nf4"]
    elif case == "prodigy_missing":
        pytest.importorskip("importlib").util.find_spec("prodigyopt") and pytest.skip("prodigyopt is installed")
        args += ["--optimizer", "prodigy"]
    elif case == "existing_run":
        (tmp_path / "out" / "checkpoint-250").mkdir(parents=True)
        (tmp_path / "out" / ADAPTER_FILENAME).write_bytes(b"user file")
    if case == "missing_model":
        proc = run_script([sys.executable, "-m", "qrlora.train", *args], check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        errors = [l for l in proc.stderr.splitlines() if "error:" in l]
        assert len(errors) == 1 and expect in errors[0], proc.stderr[-2000:]
    else:
        from qrlora.cli.train import main

        assert expect in one_error(capsys, lambda: main(args))
    if case == "existing_run":
        assert (tmp_path / "out" / ADAPTER_FILENAME).read_bytes() == b"user file"


def test_prior_preservation_generates_missing_class_images(tiny_sd3, tmp_path):
    from qrlora.cli.train import main

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    shutil.copy(REPO / "assets/cnt/cat/cat_0.jpg", class_dir / "existing.jpg")  # one there, two to generate
    final = main(train_args(tiny_sd3, tmp_path / "out", 2, "--with_prior_preservation", "--class_data_dir", str(class_dir),
                            "--class_prompt", "a photo of a cat", "--num_class_images", "3",
                            "--validation_inference_steps", "2", "--train_batch_size", "2"))
    generated = sorted(p for p in class_dir.iterdir() if p.suffix == ".png")
    assert len(generated) == 2 and all(Image.open(p).size == (64, 64) for p in generated)
    assert any(torch.count_nonzero(t["delta_r"]) for t in load_adapter(final).layers.values())


def test_broken_images_and_other_files_are_named_in_one_warning_each(tmp_path):
    from qrlora.training.data import list_images

    shutil.copy(REPO / "assets/cnt/cat/cat_0.jpg", tmp_path / "good.jpg")
    (tmp_path / "broken.png").write_bytes(b"nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning) as caught:
        assert len(list_images(tmp_path, "--instance_data_dir")) == 1
    said = [str(w.message) for w in caught]
    assert len(said) == 2 and not any("unreadable" in m for m in said), said  # a text file is not "unreadable"
    assert "skipped 1 image file(s)" in said[0] and "broken.png (not a readable image)" in said[0]
    assert "ignored 1 file(s)" in said[1] and "that are neither images" in said[1] and said[1].endswith(": notes.txt")


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_sd3, tmp_path, monkeypatch):
    from qrlora.backbones.base import Backbone
    from qrlora.cli.train import main

    original = Backbone.training_loss
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        calls["n"] += 1
        loss = original(self, *a, **k)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(Backbone, "training_loss", poisoned)
    with pytest.raises(SystemExit) as exc:
        main(train_args(tiny_sd3, tmp_path, 4))
    assert exc.value.code == 2
    assert (tmp_path / "checkpoint-2" / ADAPTER_FILENAME).is_file()
    assert not (tmp_path / ADAPTER_FILENAME).exists()


def test_help_lists_every_flag():
    proc = run_script([sys.executable, "-m", "qrlora.train", "--help"])
    for flag in ("--lora_init_method", "--use_zero_init", "--with_prior_preservation", "--resume_from_checkpoint",
                 "--weighting_scheme", "--cache_latents", "--gradient_checkpointing", "--base_precision", "--lora_blocks"):
        assert flag in proc.stdout
