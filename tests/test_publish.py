"""What a training run leaves for others: kohya file, model card, hub upload (recorded, no network), wandb logs."""
import json
import time

import pytest
from conftest import REPO

from qrlora.files import hub
from qrlora.files.checkpoint import ADAPTER_FILENAME, load_adapter, read_safetensors
from qrlora.errors import UserError
from qrlora.files.export import lora_factors


def train(model, out, *extra):
    from qrlora.cli.train import main

    return main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
                 "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", "2",
                 "--max_sequence_length", "16", "--output_dir", str(out), "--rank", "4",
                 "--lora_init_method", "triu_deltaR", "--validation_prompt", "a <c> cat on the beach",
                 "--num_validation_images", "1", "--validation_inference_steps", "2", *extra])


@pytest.fixture
def upload_recorder(monkeypatch):
    """huggingface_hub's create_repo / upload_folder replaced by a recorder of what would be uploaded."""
    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(*, repo_id, folder_path, ignore_patterns, **kwargs):
        from huggingface_hub.utils import filter_repo_objects
        from pathlib import Path

        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        calls["upload_folder"] = {"repo_id": repo_id, "token": kwargs.get("token"),
                                  "files": sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))}
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr(hub, "create_repo", create_repo)
    monkeypatch.setattr(hub, "upload_folder", upload_folder)
    return calls


def test_run_writes_kohya_file_model_card_and_pushes(tiny_flux, tmp_path, upload_recorder):
    out = tmp_path / "my-cat-lora"
    final = train(tiny_flux, out, "--output_kohya_format", "--push_to_hub", "--checkpointing_steps", "1")
    adapter = load_adapter(final)

    kohya, _ = read_safetensors(out / "pytorch_lora_weights_kohya.safetensors")  # beside the native file
    assert any(k.startswith("lora_unet_single_blocks_") for k in kohya)
    (B, A) = lora_factors(adapter)["transformer_blocks.0.attn.to_q"]
    up, down = kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"], kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert ((up[: B.shape[0], : A.shape[0]] @ down[: A.shape[0]]) - B @ A).abs().max() < 1e-6

    card = (out / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    for expected in ("base_model" not in front or str(tiny_flux) not in front,  # local paths are not hub ids
                     "instance_prompt: a photo of a <c> cat" in front, "qr-lora" in front, "license: unknown" in front):
        assert expected
    for text in (f"`{tiny_flux}`", "flux", "`triu_deltaR`", "4 / 4 (scale 1)", "`a photo of a <c> cat`",
                 "validation/step000002_0.png", "python -m qrlora.train --pretrained_model_name_or_path",
                 "--output_kohya_format", "pipe.load_lora_weights", "python -m qrlora.merge",
                 "pytorch_lora_weights_kohya.safetensors", "check and follow the base model's licence"):
        assert text in body, text
    assert (out / "validation/step000002_0.png").is_file()

    uploaded = upload_recorder["upload_folder"]
    assert upload_recorder["create_repo"]["repo_id"] == uploaded["repo_id"] == "my-cat-lora"  # default: folder name
    assert {ADAPTER_FILENAME, "pytorch_lora_weights_kohya.safetensors", "README.md",
            "validation/step000002_0.png"} <= set(uploaded["files"])
    assert not any(f.startswith("checkpoint-") for f in uploaded["files"])  # checkpoints stay local
    assert (out / "checkpoint-1").is_dir()


def test_model_card_licence_of_known_base_models():
    from qrlora.files.model_card import base_model_license

    assert base_model_license("stabilityai/stable-diffusion-xl-base-1.0") == {"license": "openrail++"}
    assert base_model_license("black-forest-labs/FLUX.1-dev")["license_name"] == "flux-1-dev-non-commercial-license"
    assert base_model_license("someone/unknown-model") == {"license": "unknown"}


def test_push_failure_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled.")

    monkeypatch.setattr(hub, "create_repo", offline)
    with pytest.raises(UserError, match=r"--push_to_hub: uploading .* to me/run failed \(Cannot reach"):
        hub.push_run_folder(tmp_path, "me/run")


def test_kohya_flag_refuses_moe_before_loading(tiny_sd3, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(tiny_sd3, tmp_path / "run", "--lora_init_method", "moe", "--moe_num_experts", "2", "--output_kohya_format")
    assert capsys.readouterr().err.strip() == (
        "error: --output_kohya_format: a kohya LoRA file is a weight change; a moe adapter is token-dependent and has "
        "no weight change (leave out --output_kohya_format and merge the run live)")
    assert not (tmp_path / "run").exists()


def wandb_history(run_file):
    """Rows logged to an offline wandb run, read from its ``run-*.wandb`` file.

    The file is a LevelDB-style log (a 7-byte ``:W&B`` header, 32 KiB blocks of records with a 7-byte
    crc/length/type header; type 1 = full record, 2/3/4 = first/middle/last piece) of ``wandb_internal_pb2.Record``
    protobufs; wandb ships no Python reader for it any more.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, pos, pieces, rows = run_file.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pieces += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_wandb_offline_logs_losses_lr_and_validation_images(tiny_sd3, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_sd3, tmp_path / "run", "--report_to", "wandb")
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's writer is a separate service process that may still be flushing the log when finish() returns
    # (seen under load, never idle): read until the history is there, up to a minute.
    deadline = time.monotonic() + 60
    while not (rows := wandb_history(run)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [row["_step"] for row in rows] == [1, 2]
    assert all(row["loss"] > 0 and row["lr"] == 1e-4 for row in rows)
    images = rows[-1]["validation/filenames"]  # the final validation, at the last step
    assert rows[-1]["validation/_type"] == "images/separated" and len(images) == 1
    assert (run.parent / "files" / images[0]).is_file()
