"""Faults end in one line and lose nothing: hostile adapter files, run folders, full disks, odd flags and images."""
from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, error_lines, load_denoiser, make_adapter, one_error
from qrlora.files.checkpoint import ADAPTER_FILENAME, base_fingerprint, load_adapter
from qrlora.errors import UserError, cli_entry
from qrlora.files.run_folder import (CHECKPOINT_MARKER, check_finite, complete_checkpoints, resolve_resume,
                                     write_checkpoint)


@pytest.fixture(scope="module")
def adapter_file(tiny_sd3, tmp_path_factory):
    return make_adapter(tiny_sd3, "sd3", tmp_path_factory.mktemp("faults") / "good.safetensors", method="deltaR", seed=1)


# ---- one validating reader ------------------------------------------------------------------------------
LAYER = "transformer_blocks.0.attn.to_q"


def hostile(case, tensors, meta):
    """Corrupt a good file's tensors or metadata the way the issue's 60 hostile files did."""
    key = f"transformer.{LAYER}.lora.{{}}.weight"
    if case == "nan_coefficient":
        tensors[key.format("delta_r")][0, 0] = float("nan")
    elif case == "inf_basis":
        tensors[key.format("q")][1, 0] = float("inf")
    elif case == "nan_alpha":
        meta["alpha"] = "nan"
    elif case == "int_tensor":
        tensors[key.format("delta_r")] = tensors[key.format("delta_r")].to(torch.int32)
    elif case == "q_rank_differs":
        tensors[key.format("q")] = tensors[key.format("q")][:, :3].contiguous()
    elif case == "one_d":
        tensors[key.format("delta_r")] = tensors[key.format("delta_r")].reshape(-1).contiguous()
    elif case == "wrong_input_width":
        tensors[key.format("delta_r")] = tensors[key.format("delta_r")][:, :-1].contiguous()
    elif case == "zero_size":
        for name in ("q", "base_r", "delta_r"):
            t = tensors[key.format(name)]
            tensors[key.format(name)] = t.new_zeros((0, t.shape[1]) if name == "q" else (t.shape[0], 0))
    elif case == "method_missing":
        del meta["method"]
    elif case == "method_unknown":
        meta["method"] = "dora"
    elif case == "rank_not_a_number":
        meta["rank"] = "four"
    elif case == "rank_zero":
        meta["rank"] = "0"
    elif case == "foreign_tensor":
        tensors[key.format("q0")] = tensors[key.format("q")].clone()


EXPECT = {"nan_coefficient": "delta_r holds NaN or inf", "inf_basis": "q holds NaN or inf", "nan_alpha": "'alpha' is nan",
          "int_tensor": "dtype torch.int32", "q_rank_differs": "q has shape", "one_d": "delta_r is 1-D",
          "wrong_input_width": "delta_r has shape", "zero_size": "empty tensors", "method_missing": "'method' is None",
          "method_unknown": "'method' is 'dora'", "rank_not_a_number": "'rank' is 'four'", "rank_zero": "rank must be a positive integer, got 0",
          "foreign_tensor": "holds q0"}
NAMES_LAYER = {"nan_coefficient", "inf_basis", "int_tensor", "q_rank_differs", "one_d", "wrong_input_width", "zero_size",
               "foreign_tensor"}


@pytest.mark.parametrize("case", list(EXPECT))
def test_hostile_adapter_files_are_refused_naming_file_and_layer(case, adapter_file, tmp_path):
    from safetensors import safe_open

    tensors = load_file(str(adapter_file))
    with safe_open(str(adapter_file), "pt") as f:
        meta = dict(f.metadata())
    hostile(case, tensors, meta)
    bad = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(UserError) as err:
        load_adapter(bad)
    message = str(err.value)
    assert str(bad) in message and EXPECT[case] in message, message
    if case in NAMES_LAYER:
        assert LAYER in message, message


@pytest.mark.parametrize("tool", ["export", "merge", "extract", "analysis"])
def test_every_tool_refuses_a_nan_adapter_in_one_line(tool, adapter_file, tiny_sd3, tmp_path, capsys):
    tensors = load_file(str(adapter_file))
    tensors[f"transformer.{LAYER}.lora.delta_r.weight"][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    from safetensors import safe_open

    with safe_open(str(adapter_file), "pt") as f:
        save_file(tensors, str(bad), metadata=f.metadata())
    from qrlora.cli import export, merge, residual
    from qrlora.evaluation.analysis import run_similarity

    calls = {
        "export": lambda: export.main([str(bad), str(tmp_path / "out.safetensors")]),
        "merge": lambda: merge.merge_main(["--model_path", str(tiny_sd3), "--adapters", str(bad), "--no_render"]),
        "extract": lambda: residual.extract_main(["--model_path", str(tiny_sd3), "--lora_path", str(bad),
                                                  "--output_dir", str(tmp_path)]),
        "analysis": lambda: cli_entry(run_similarity)(str(adapter_file), str(bad), tmp_path / "analysis", progress=False),
    }
    line = one_error(capsys, calls[tool])
    assert str(bad) in line and "NaN" in line and LAYER in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]  # nothing written


def lora_file(path, rank=4, metadata=None, alpha_keys=None):
    """A diffusers-layout LoRA (``lora_A`` / ``lora_B``) on two tiny SD3 layers."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"):
        tensors[f"transformer.{layer}.lora_A.weight"] = torch.randn(rank, 32, generator=gen)
        tensors[f"transformer.{layer}.lora_B.weight"] = torch.randn(32, rank, generator=gen)
        if alpha_keys is not None:
            tensors[f"transformer.{layer}.alpha"] = torch.tensor(float(alpha_keys))
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_diffusers_lora_alpha_is_read_and_matches_fuse_lora(tiny_sd3, tmp_path):
    """``lora_alpha = 16, r = 4`` scales by 4, as diffusers' own ``fuse_lora`` does (the issue saw 4x too weak)."""
    import diffusers

    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 16,
                                                                 "transformer.target_modules": ["to_q", "to_k"]})}
    path = lora_file(tmp_path / "peft.safetensors", metadata=meta)
    adapter = load_adapter(path)
    assert adapter.config.scale == 4.0
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny_sd3, torch_dtype=torch.float32)
    before = {p: pipe.transformer.get_submodule(p).weight.detach().clone() for p in adapter.layers}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    for layer, dW in adapter.delta_weights().items():
        fused = pipe.transformer.get_submodule(layer)
        fused = getattr(fused, "base_layer", fused).weight.detach()
        assert torch.allclose(fused - before[layer], dW, atol=1e-4), layer


def test_alpha_keys_and_missing_alpha(tmp_path, capsys):
    assert load_adapter(lora_file(tmp_path / "kohya.safetensors", alpha_keys=8)).config.scale == 2.0
    plain = lora_file(tmp_path / "plain.safetensors")
    assert load_adapter(plain).config.scale == 1.0
    assert load_adapter(plain).config.scale == 1.0
    notes = [l for l in capsys.readouterr().err.splitlines() if l.startswith("note:")]
    assert notes == [f"note: {plain}: no alpha in the file; using alpha = rank = 4 (scale 1)"]  # said once


def test_a_folder_given_as_a_file(tmp_path):
    with pytest.raises(UserError, match="is a folder, not a safetensors file"):
        load_adapter(tmp_path)


# ---- base models compared by content ----------------------------------------------------------------------
def test_base_models_are_compared_by_content_not_path(tiny_sd3, tiny_flux, adapter_file, tmp_path):
    from qrlora.merging.merger import Merger, check_compatible

    denoiser = load_denoiser(tiny_sd3, "sd3")
    weights = {p: denoiser.get_submodule(p).weight for p in load_adapter(adapter_file).layers}
    tensors = load_file(str(adapter_file))

    def with_meta(name, **changes):
        from safetensors import safe_open

        with safe_open(str(adapter_file), "pt") as f:
            meta = {**f.metadata(), **changes}
        save_file(tensors, str(tmp_path / name), metadata=meta)
        return load_adapter(tmp_path / name)

    same = with_meta("same.safetensors", base_fingerprint=base_fingerprint(weights), base_model="/elsewhere/sd3")
    also = with_meta("also.safetensors", base_fingerprint=base_fingerprint(weights))
    check_compatible([same, also])  # one model opened from two paths: accepted
    Merger(denoiser, [same, also])
    other = with_meta("other.safetensors", base_fingerprint=base_fingerprint({p: w * 1.5 for p, w in weights.items()}))
    with pytest.raises(UserError, match="different base models"):
        check_compatible([same, other])
    with pytest.raises(UserError, match="trained on another base model"):
        Merger(load_denoiser(tiny_sd3, "sd3"), [other])
    flux = make_adapter(tiny_flux, "flux", tmp_path / "flux.safetensors")
    from qrlora.evaluation.analysis import load_pair

    with pytest.raises(UserError, match="is a flux adapter"):
        load_pair(adapter_file, flux)


# ---- run folders -------------------------------------------------------------------------------------------
def fake_save(folder):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, folder / ADAPTER_FILENAME)  # whole files: resume checks their sizes and headers
    (folder / "optimizer.bin").write_bytes(b"state")


def test_checkpoints_are_atomic_pruned_after_completion_and_latest_skips_incomplete(tmp_path, caplog):
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, fake_save, is_main=True, barrier=lambda: None, keep=2)
    assert [d.name for d in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]

    def full_disk(folder):
        fake_save(folder)
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optimizer.bin"))

    with pytest.raises(UserError, match="checkpoint-4: could not be written \\(No space left on device\\); last "
                                        "complete checkpoint: .*checkpoint-3"):
        write_checkpoint(tmp_path, 4, full_disk, is_main=True, barrier=lambda: None, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # nothing lost, no debris
    (tmp_path / "checkpoint-3" / CHECKPOINT_MARKER).unlink()  # as an older version's interrupted save left it
    with caplog.at_level("WARNING"):
        assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-2"
    assert "skipped incomplete checkpoint-3" in caplog.text and "resuming from" in caplog.text
    with pytest.raises(UserError, match="is incomplete"):
        resolve_resume("checkpoint-3", tmp_path)


def test_diverged_parameters_are_never_checkpointed(tmp_path):
    check_finite([torch.ones(3)], "checkpoint-1", tmp_path)
    for value in (float("nan"), float("inf"), 1e30):  # 1e30 is finite, but the next forward overflows
        with pytest.raises(UserError, match="diverged"):
            check_finite([torch.tensor([0.0, value])], "checkpoint-2", tmp_path)


def test_second_run_in_one_folder_is_refused_naming_the_holder(tiny_sd3, tmp_path, capsys):
    from qrlora.cli.train import main

    from test_train import train_args

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from qrlora.files.run_folder import RunLock; "
                               f"RunLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); time.sleep(120)"],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error(capsys, lambda: main(train_args(tiny_sd3, tmp_path / "run", 1)))
    finally:
        holder.kill()
        holder.wait()
    assert f"{tmp_path / 'run'} is in use by another training run (pid {holder.pid})" in line
    main(train_args(tiny_sd3, tmp_path / "run", 1))  # the holder is gone: the kernel dropped its lock
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["README.md", "config.toml", "dataset.json", ADAPTER_FILENAME]  # + card, settings, data record


def test_resume_refuses_changed_settings(tiny_sd3, tmp_path, capsys):
    from qrlora.cli.train import main

    from test_train import train_args

    out = tmp_path / "run"
    main(train_args(tiny_sd3, out, 3))
    assert (out / "checkpoint-2" / CHECKPOINT_MARKER).is_file() and not list(out.glob(".*"))
    before = (out / ADAPTER_FILENAME).read_bytes()
    for flags, named in ((["--rank", "2"], "rank 4"), (["--lora_init_method", "svd"], "method triu_deltaR"),
                         (["--lora_alpha", "8"], "alpha 4.0"), (["--lora_layers", "to_q"], "target_modules")):
        line = one_error(capsys, lambda: main(train_args(tiny_sd3, out, 3, "--resume_from_checkpoint", "latest", *flags)))
        assert "checkpoint-2: it was trained with " + named in line, line
    assert (out / ADAPTER_FILENAME).read_bytes() == before


# ---- flags -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--checkpointing_steps", "0"), ("--validation_epochs", "0"),
                                        ("--gradient_accumulation_steps", "0"), ("--train_batch_size", "0"),
                                        ("--resolution", "0"), ("--resolution", "-64"), ("--learning_rate", "nan"),
                                        ("--max_train_steps", "-5"), ("--max_train_steps", "0")])
def test_trainer_flags_are_checked_before_anything_runs(flag, value, capsys):
    from qrlora.cli.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and flag in err, err


@pytest.mark.parametrize("flags,expect", [(["--weights", "nan"], "--weights"), (["--height", "7"], "--height")])
def test_merge_flags(flags, expect, adapter_file, tiny_sd3, capsys):
    from qrlora.cli.merge import merge_main

    line = one_error(capsys, lambda: merge_main(["--model_path", str(tiny_sd3), "--adapters", str(adapter_file), *flags]))
    assert expect in line


# ---- outputs ---------------------------------------------------------------------------------------------------
def test_existing_outputs_are_not_overwritten_silently(adapter_file, tiny_sd3, tmp_path, capsys):
    from qrlora.cli.merge import grid_main

    (tmp_path / "grid.png").write_bytes(b"user's grid")
    line = one_error(capsys, lambda: grid_main(["--model_path", str(tiny_sd3), "--style_lora_path", str(adapter_file),
                                                "--content_lora_path", str(adapter_file), "--output_dir", str(tmp_path)]))
    assert "grid.png already exists; pass --overwrite" in line
    assert (tmp_path / "grid.png").read_bytes() == b"user's grid"
    line = one_error(capsys, lambda: grid_main(["--model_path", str(tiny_sd3), "--style_lora_path", str(adapter_file),
                                                "--content_lora_path", str(adapter_file),
                                                "--output_dir", str(tmp_path / "grid.png" / "x")]))
    assert "is a file, not a folder" in line


def test_disk_full_ends_in_one_line_and_leaves_nothing(adapter_file, tmp_path):
    """A file-size limit in a child process makes every write past 4 KiB fail, as a full disk does."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "qrlora.export", str(adapter_file), str(out / "lora.safetensors")],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          preexec_fn=limit)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "lora.safetensors" in lines[0], proc.stderr
    assert list(out.iterdir()) == []  # no truncated file, no temporary


def test_os_errors_become_one_line_naming_the_path(tmp_path, capsys):
    @cli_entry
    def writes_into_a_file():
        (tmp_path / "file").write_text("x")
        (tmp_path / "file" / "sub").mkdir()

    line = one_error(capsys, writes_into_a_file)
    assert line.startswith(f"error: {tmp_path / 'file' / 'sub'}: ")


def test_atomic_files_respect_the_umask(adapter_file, tmp_path):
    from qrlora.files.checkpoint import save_adapter

    old = os.umask(0o022)
    try:
        save_adapter(tmp_path / "a.safetensors", load_adapter(adapter_file))
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644


# ---- images ------------------------------------------------------------------------------------------------------
def test_odd_images(tmp_path, monkeypatch):
    from qrlora.training.data import list_images

    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 16-bit grey, 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "a_grey16.png")
    Image.new("RGB", (2600, 2100), "red").save(tmp_path / "b_large.jpg")
    Image.new("L", (3000, 3000)).save(tmp_path / "c_bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)  # PIL refuses > 2x this: 9 M pixels is a bomb here
    with pytest.warns(UserWarning, match="skipped 1 image file\\(s\\).*c_bomb.png \\(larger than PIL allows\\)"):
        grey, large = list_images(tmp_path, "--instance_data_dir", resolution=64)
    values = np.asarray(grey)[..., 0]
    assert np.array_equal(values, np.round(ramp * (255 / 65535)).astype(np.uint8))  # the ramp, not uniform white
    assert 1024 <= min(large.size) < 2100  # shrunk while loading, detail kept for the resize
