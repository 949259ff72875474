"""Training on one's own captioned data (issue 29): sidecar captions, the caption prefix, dataset.json, cache keys
on caption and bucket, and the bad inputs of a captioned folder, on every backbone."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

from conftest import one_error
from qrlora.backbones import BACKBONES
from qrlora.files.checkpoint import load_adapter

SIZES = [(96, 64), (64, 96), (80, 80), (128, 72)]  # (width, height): the mixed folder


def captioned_folder(folder, captions=("a red <c> box", "a green <c> box", "a blue <c> box", None)):
    """Images of mixed sizes; image i gets the sidecar caption ``captions[i]`` (None: no caption file)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, ((w, h), caption) in enumerate(zip(SIZES, captions)):
        Image.new("RGB", (w, h), (60 * i, 120, 200 - 40 * i)).save(folder / f"img{i}.png")
        if caption is not None:
            (folder / f"img{i}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def train(model, data, out, *extra, cache=None, flag="--instance_data_dir"):
    from qrlora.cli.train import main

    flags = ["--pretrained_model_name_or_path", str(model), flag, str(data), "--resolution", "64",
             "--max_train_steps", "2", "--max_sequence_length", "48", "--output_dir", str(out), *extra]
    return main(flags + (["--cache_dir", str(cache)] if cache else []))


def cache_keys(cache, kind):
    return [json.loads(p.read_text())["key"] for p in sorted(cache.glob("*.json"))
            if p.name != "file_hashes.json" and json.loads(p.read_text())["key"]["kind"] == kind]


@pytest.mark.parametrize("name", ["sd3", "flux", "sdxl"])
def test_sidecar_captions_reach_the_text_encoders_and_the_run_records_them(name, request, tmp_path, monkeypatch):
    model = request.getfixturevalue(f"tiny_{name}")
    backbone_class = type(BACKBONES[name])
    encoded = []
    real = backbone_class.encode_prompts

    def spy(self, pipe, prompts, *args, **kwargs):
        encoded.append(list(prompts))
        return real(self, pipe, prompts, *args, **kwargs)
    monkeypatch.setattr(backbone_class, "encode_prompts", spy)
    data = captioned_folder(tmp_path / "data")
    (data / "notes.md").write_text("not a caption")
    with pytest.warns(UserWarning) as caught:
        train(model, data, tmp_path / "run", "--instance_prompt", "a <c> box", "--caption_prefix", "zxq,",
              cache=tmp_path / "cache")
    said = [str(w.message) for w in caught]
    assert any("1 of 4 image(s)" in m and "img3.png" in m and "--instance_prompt 'a <c> box'" in m for m in said), said
    assert any("ignored 1 file(s)" in m and "nor captions (*.txt): notes.md" in m for m in said), said
    assert not any("unreadable" in m for m in said), said
    used = ["zxq, a red <c> box", "zxq, a green <c> box", "zxq, a blue <c> box", "a <c> box"]
    assert encoded == [used]  # every distinct caption, prefix applied, once; the fallback as typed
    record = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert [(i["image"], i["caption"], i["repeats"], i["bucket"]) for i in record["images"]] == [
        (f"img{i}.png", caption, 1, [64, 64]) for i, caption in enumerate(used)]
    assert record["caption_sources"] == {"caption file": 3, "instance prompt": 1} and record["buckets"] == {"64x64": 4}
    assert [k["prompts"] for k in cache_keys(tmp_path / "cache", "prompts")] == [used]
    latents = cache_keys(tmp_path / "cache", "latents")
    assert sorted((k["caption"], tuple(k["bucket"])) for k in latents) == sorted((c, (64, 64)) for c in used)


def test_captions_change_what_is_learned_and_a_changed_caption_is_encoded_again(tiny_sd3, tmp_path):
    """The issue's finding: adapters from a captioned folder and from one prompt were bit-identical."""
    plain = captioned_folder(tmp_path / "plain", captions=(None,) * 4)
    captioned = captioned_folder(tmp_path / "captioned")
    one = load_adapter(train(tiny_sd3, plain, tmp_path / "one", "--instance_prompt", "a <c> box"))
    own = load_adapter(train(tiny_sd3, captioned, tmp_path / "own", "--instance_prompt", "a <c> box", cache=tmp_path / "cache"))
    assert any(not torch.equal(one.layers[p]["delta_r"], own.layers[p]["delta_r"]) for p in one.layers)
    before = len(cache_keys(tmp_path / "cache", "latents"))
    (captioned / "img0.txt").write_text("a striped <c> box")
    train(tiny_sd3, captioned, tmp_path / "again", "--instance_prompt", "a <c> box", cache=tmp_path / "cache")
    keys = cache_keys(tmp_path / "cache", "latents")
    assert len(keys) == before + 1 and any(k["caption"] == "a striped <c> box" for k in keys)
    assert len(cache_keys(tmp_path / "cache", "prompts")) == 2  # the new caption set is a new prompt entry


def test_instance_prompt_is_optional_when_every_image_has_a_caption(tiny_sd3, tmp_path):
    data = captioned_folder(tmp_path / "data", captions=("a red <c> box", "a green <c> box", "a blue <c> box", "a <c> box"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = train(tiny_sd3, data, tmp_path / "run")
    assert not any("caption" in str(w.message) for w in caught)  # nothing to say: every image has its caption
    assert load_adapter(final).metadata["instance_prompt"] in {"a red <c> box", "a green <c> box", "a blue <c> box", "a <c> box"}


@pytest.mark.parametrize("case,expect", [
    ("no_prompt", "--instance_prompt is required: 1 of 4 image(s) in {data} have no caption (*.txt): img3.png"),
    ("require", "--require_captions: 1 of 4 image(s) in {data} have no caption (*.txt): img3.png"),
    ("not_utf8", "caption file {data}/img0.txt is not UTF-8 text (byte 2); save it as UTF-8"),
    ("empty", "caption file {data}/img1.txt is empty"),
    ("too_long", "caption file of img2.png 'a blue <c> box"),
    ("bad_extension", "--caption_extension must be a file extension such as .txt or .caption, got 'txt'"),
])
def test_bad_captions_are_one_line_and_train_nothing(case, expect, tiny_sd3, tmp_path, capsys):
    data = captioned_folder(tmp_path / "data")
    extra = {"require": ["--require_captions", "--instance_prompt", "p"], "bad_extension": ["--caption_extension", "txt"]}.get(case, [])
    if case not in ("no_prompt", "require", "bad_extension"):
        extra = ["--instance_prompt", "p"]
    if case == "not_utf8":
        (data / "img0.txt").write_bytes(b"a \xff\xfe box")
    elif case == "empty":
        (data / "img1.txt").write_text(" \n\t")
    elif case == "too_long":
        (data / "img2.txt").write_text("a blue <c> box " + "with many more words " * 12)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        line = one_error(capsys, lambda: train(tiny_sd3, data, out, *extra))
    assert expect.format(data=data) in line, line
    if case == "too_long":
        assert "tokens and would drop" in line and "token(s))" in line and "...'" in line, line
    assert not out.exists()


# ---- config files ------------------------------------------------------------------------------------------------
def test_config_file_sets_flags_the_command_line_overrides(tmp_path):
    from qrlora.cli.train import parse_args

    toml = tmp_path / "run.toml"
    toml.write_text('pretrained_model_name_or_path = "m"\n[data]\ninstance_data_dir = "d"\ninstance_prompt = "p"\n'
                    '[adapter]\nrank = 8\nuse_zero_init = false\nlearning_rate = 3e-4\n')
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("pretrained_model_name_or_path: m\ndata:\n  instance_data_dir: d\n  instance_prompt: p\n"
                         "rank: 8\nuse_zero_init: false\nlearning_rate: 3e-4\n")  # YAML 1.1 reads 3e-4 as text
    for path in (toml, yaml_file):
        settings = parse_args(["--config", str(path)])
        assert (settings.rank, settings.use_zero_init, settings.learning_rate, settings.instance_prompt) == (8, False, 3e-4, "p")
        assert parse_args(["--rank", "16", "--config", str(path), "--use_zero_init"]).rank == 16  # the command line wins
        assert parse_args(["--config", str(path), "--use_zero_init"]).use_zero_init


@pytest.mark.parametrize("text,expect", [
    ('rnak = 8', "unknown key 'rnak'; did you mean rank (--rank)?"),
    ('rank = "big"', "rank = 'big' must be an integer"),
    ('use_zero_init = "yes"', "use_zero_init = 'yes' must be true or false"),
    ('rank = ', "does not parse"),
    ('rank = 8\n[x]\nrank = 4', "sets rank twice"),
])
def test_bad_config_file_is_one_line_naming_file_and_key(text, expect, tmp_path, capsys):
    from qrlora.cli.train import main

    path = tmp_path / "run.toml"
    path.write_text(text + "\n")
    line = one_error(capsys, lambda: main(["--config", str(path), "--output_dir", str(tmp_path / "run")]))
    assert str(path) in line and expect in line, line
    assert not (tmp_path / "run").exists()


def test_training_again_from_the_written_config_gives_the_same_adapter(tiny_sd3, tmp_path):
    data = captioned_folder(tmp_path / "data")
    first = train(tiny_sd3, data, tmp_path / "a", "--instance_prompt", "a <c> box", "--rank", "2", "--random_flip",
                  "--lora_init_method", "triu_deltaR", "--learning_rate", "1e-3", "--hub_token", "hf_secret")
    config = (tmp_path / "a" / "config.toml").read_text()
    assert "hf_secret" not in config and "hub_token =" not in config and 'lora_init_method = "triu_deltaR"' in config
    from qrlora.cli.train import main

    second = main(["--config", str(tmp_path / "a" / "config.toml"), "--output_dir", str(tmp_path / "b")])
    one, two = load_adapter(first), load_adapter(second)
    assert set(one.layers) == set(two.layers)
    assert all(torch.equal(one.layers[p][k], two.layers[p][k]) for p in one.layers for k in one.layers[p])
    assert any(torch.count_nonzero(one.layers[p]["delta_r"]) for p in one.layers)  # it trained


@pytest.mark.parametrize("example", ["sd3.toml", "flux.toml", "sdxl.yaml"])
def test_example_configs_parse_for_their_backbone(example):
    from qrlora.cli.train import parse_args
    from conftest import REPO

    settings = parse_args(["--config", str(REPO / "configs" / example)])
    backbone = BACKBONES[example.split(".")[0]]
    assert settings.backbone == backbone.name and settings.pretrained_model_name_or_path == backbone.default_model
    assert settings.output_dir.startswith(backbone.run_root + "/")


def test_wrapper_takes_config_in_place_of_its_defaults():
    import shlex

    from conftest import REPO, run_script

    proc = run_script(["bash", "SD3_dir/train_deltaR_sty.sh", "cpu", "4", "--seed", "3"],
                      env={"DRY_RUN": "1", "CONFIG": str(REPO / "configs/sd3.toml")})
    command = shlex.split(proc.stdout)
    assert command[command.index("--config") + 1] == str(REPO / "configs/sd3.toml")
    assert "--instance_prompt" not in command and "--max_train_steps" not in command  # the file's, not the wrapper's
    from qrlora.cli.train import parse_args

    settings = parse_args(command[3:])
    assert (settings.rank, settings.seed, settings.caption_prefix) == (4, 3, "<c>")  # RANK and later flags win


# ---- kohya folders, datasets, caption dropout ----------------------------------------------------------------------
def spy_prompts(monkeypatch, name="sd3"):
    backbone_class = type(BACKBONES[name])
    encoded, real = [], backbone_class.encode_prompts

    def spy(self, pipe, prompts, *args, **kwargs):
        encoded.append(list(prompts))
        return real(self, pipe, prompts, *args, **kwargs)
    monkeypatch.setattr(backbone_class, "encode_prompts", spy)
    return encoded


def test_kohya_folders_give_repeats_and_their_name_as_caption(tiny_sd3, tmp_path, monkeypatch):
    encoded = spy_prompts(monkeypatch)
    root = tmp_path / "train"
    captioned_folder(root / "3_zxq box", captions=("a red zxq box", None, None, None))
    captioned_folder(root / "1_qxz style", captions=(None,) * 4)
    (root / "notes").mkdir()
    with pytest.warns(UserWarning, match="ignored 1 subfolder.*notes"):
        train(tiny_sd3, root, tmp_path / "run", "--repeats", "2")
    record = json.loads((tmp_path / "run" / "dataset.json").read_text())
    by_name = {i["image"]: i for i in record["images"]}
    assert by_name["3_zxq box/img0.png"]["caption"] == "a red zxq box" and by_name["3_zxq box/img0.png"]["repeats"] == 6
    assert by_name["3_zxq box/img1.png"]["caption"] == "zxq box" and by_name["3_zxq box/img1.png"]["caption_source"] == "folder name"
    assert by_name["1_qxz style/img2.png"]["caption"] == "qxz style" and by_name["1_qxz style/img2.png"]["repeats"] == 2
    assert record["items_per_epoch"] == 4 * 6 + 4 * 2
    assert encoded == [["qxz style", "a red zxq box", "zxq box"]]  # distinct captions, first seen first (folders in name order)


def imagefolder(folder, lines=None):
    captioned_folder(folder, captions=(None,) * 4)
    rows = lines or [json.dumps({"file_name": f"img{i}.png", "text": f"a zxq box number {i}"}) for i in range(4)]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def test_a_datasets_imagefolder_and_a_saved_dataset_train_on_their_captions(tiny_sd3, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    encoded = spy_prompts(monkeypatch)
    folder = imagefolder(tmp_path / "hf")
    train(tiny_sd3, folder, tmp_path / "run", flag="--dataset_name")
    captions = [f"a zxq box number {i}" for i in range(4)]
    record = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert [(i["image"], i["caption"], i["caption_source"]) for i in record["images"]] == [
        (f"img{i}.png", c, "caption column") for i, c in enumerate(captions)]
    saved = tmp_path / "saved"
    rows = [{"picture": Image.new("RGB", (64, 80), (40 * i, 0, 0)), "words": f"row {i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).cast_column("picture", datasets.Image()).save_to_disk(str(saved))
    train(tiny_sd3, saved, tmp_path / "run2", "--image_column", "picture", "--caption_column", "words", flag="--dataset_name")
    assert encoded == [captions, ["row 0", "row 1", "row 2"]]
    # the same folder as --instance_data_dir says what its metadata file is for
    with pytest.warns(UserWarning, match="metadata.jsonl \\(an imagefolder's captions: pass the folder as --dataset_name\\)"):
        train(tiny_sd3, folder, tmp_path / "run3", "--instance_prompt", "p")


@pytest.mark.parametrize("case,expect", [
    ("bad_line", "metadata.jsonl line 2 is not JSON"),
    ("missing_file", "metadata.jsonl line 1: file_name 'gone.png' does not exist"),
    ("missing_column", "--caption_column 'caption': {folder}/metadata.jsonl line 1 has no such key"),
    ("no_image_column", "--image_column 'photo': dataset {folder} has no such column"),
    ("both", "--instance_data_dir and --dataset_name both name the training images"),
])
def test_bad_datasets_are_one_line(case, expect, tiny_sd3, tmp_path, capsys):
    pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    rows = {"bad_line": ['{"file_name": "img0.png", "text": "a"}', '{"file_name": img1.png}'],
            "missing_file": ['{"file_name": "gone.png", "text": "a"}']}.get(case)
    imagefolder(folder, rows)
    extra = {"missing_column": ["--caption_column", "caption"], "no_image_column": ["--image_column", "photo"],
             "both": ["--instance_data_dir", str(folder)]}.get(case, [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        line = one_error(capsys, lambda: train(tiny_sd3, folder, tmp_path / "run", *extra, flag="--dataset_name"))
    assert expect.format(folder=folder) in line, line
    assert not (tmp_path / "run").exists()


def test_a_hub_dataset_without_network_is_one_line(tiny_sd3, tmp_path):
    pytest.importorskip("datasets")
    import os
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, "-m", "qrlora.train", "--pretrained_model_name_or_path", str(tiny_sd3),
                           "--dataset_name", "someone/my-dogs", "--output_dir", str(tmp_path / "run")],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "--dataset_name someone/my-dogs: cannot load it (not a local folder; the hub could not be reached" in errors[0]


def test_caption_dropout_is_seeded_per_step_and_leaves_class_images_alone():
    from qrlora.training.data import drop_captions

    ids = torch.tensor([0, 1, 2, 3, 7, 7])  # 4 instance images, then 2 class images (prompt 7)
    draws = [drop_captions(ids, 4, 0.5, 9, seed=0, step=s, micro=0, process=0) for s in range(40)]
    assert all(torch.equal(d, drop_captions(ids, 4, 0.5, 9, seed=0, step=s, micro=0, process=0)) for s, d in enumerate(draws))
    dropped = torch.stack([d[:4] == 9 for d in draws]).float().mean().item()
    assert 0.3 < dropped < 0.7 and all(torch.equal(d[4:], ids[4:]) for d in draws)
    assert torch.equal(drop_captions(ids, 4, 1.0, 9, 0, 0, 0, 0)[:4], torch.full((4,), 9))
    assert torch.equal(drop_captions(ids, 4, 0.0, 9, 0, 0, 0, 0), ids)


def test_caption_dropout_trains_on_the_empty_prompt_and_resumes_exactly(tiny_sd3, tmp_path, monkeypatch):
    import shutil

    encoded = spy_prompts(monkeypatch)
    data = captioned_folder(tmp_path / "data", captions=("a red <c> box",) * 4)
    flags = ["--proportion_empty_prompts", "0.5", "--max_train_steps", "4", "--checkpointing_steps", "2"]
    straight = train(tiny_sd3, data, tmp_path / "a", *flags)
    assert encoded[0] == ["a red <c> box", ""]
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = train(tiny_sd3, data, tmp_path / "b", *flags, "--resume_from_checkpoint", "latest")
    plain = train(tiny_sd3, data, tmp_path / "c", "--max_train_steps", "4")
    a, b, c = load_adapter(straight), load_adapter(resumed), load_adapter(plain)
    assert all(torch.equal(a.layers[p]["delta_r"], b.layers[p]["delta_r"]) for p in a.layers)
    assert any(not torch.equal(a.layers[p]["delta_r"], c.layers[p]["delta_r"]) for p in a.layers)  # it dropped some


def test_square_crops_that_lose_much_or_upscale_much_are_named_in_one_warning(tmp_path):
    from qrlora.training.data import DreamBoothDataset

    data = captioned_folder(tmp_path / "data")  # 96x64, 64x96, 80x80, 128x72 (the last loses 44 % of its width)
    with pytest.warns(UserWarning) as caught:
        DreamBoothDataset(data, resolution=160, instance_prompt="p")
    said = [str(w.message) for w in caught if "to the crop" in str(w.message) or "upscaled" in str(w.message)]
    assert len(said) == 1, said
    assert ("3 upscaled more than 2x (use larger images or lower --resolution): img0.png (96x64 -> 160x160), "
            "img1.png (64x96 -> 160x160), img3.png (128x72 -> 160x160)") in said[0]
    assert "img3.png (128x72, 44%)" in said[0] and "img2.png (80x80, " not in said[0]  # a square loses nothing
    square = tmp_path / "square"
    square.mkdir()
    Image.new("RGB", (80, 80)).save(square / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 80 px at 64: shrunk, nothing cropped, no warning
        DreamBoothDataset(square, resolution=64, instance_prompt="p")


# ---- validation loss -------------------------------------------------------------------------------------------------
def test_validation_loss_falls_is_recorded_and_costs_no_training_randomness(tiny_sd3, tmp_path):
    data = captioned_folder(tmp_path / "data", captions=("a red <c> box",) * 4)
    held = captioned_folder(tmp_path / "held", captions=("a red <c> box",) * 4)  # the same look: the loss must fall
    flags = ["--max_train_steps", "6", "--learning_rate", "1e-2", "--lora_init_method", "triu_deltaR"]
    plain = train(tiny_sd3, data, tmp_path / "plain", *flags)
    validated = train(tiny_sd3, data, tmp_path / "val", *flags, "--validation_data_dir", str(held), "--validation_steps", "4")
    a, b = load_adapter(plain), load_adapter(validated)
    assert all(torch.equal(a.layers[p]["delta_r"], b.layers[p]["delta_r"]) for p in a.layers)
    record = json.loads((tmp_path / "val" / "validation_loss.json").read_text())
    assert list(record["losses"]) == ["0", "4", "6"] and record["images"] == 4
    losses = record["losses"]
    assert losses["6"] < losses["0"], losses  # it learned the held-out images' look
    assert record["best_loss"] == min(losses.values()) and str(record["best_step"]) in losses
    assert losses[str(record["best_step"])] == record["best_loss"]


def test_validation_split_holds_images_out_of_training(tiny_sd3, tmp_path, capsys):
    data = captioned_folder(tmp_path / "data", captions=("a red <c> box",) * 4)
    train(tiny_sd3, data, tmp_path / "run", "--validation_split", "0.25")
    trained = json.loads((tmp_path / "run" / "dataset.json").read_text())["images"]
    assert len(trained) == 3 and json.loads((tmp_path / "run" / "validation_loss.json").read_text())["images"] == 1
    line = one_error(capsys, lambda: train(tiny_sd3, data, tmp_path / "bad", "--validation_split", "0.5",
                                           "--validation_data_dir", str(data)))
    assert "--validation_split and --validation_data_dir both name held-out images" in line and not (tmp_path / "bad").exists()


def test_the_validation_loss_is_the_same_number_for_the_same_model(tiny_sd3, tmp_path):
    import contextlib

    from qrlora.backbones import detect_backbone
    from qrlora.training.encoders import Encoders
    from qrlora.training.settings import TrainSettings
    from qrlora.training.sources import CaptionRules, folder_examples
    from qrlora.training.validation_loss import ValidationLoss

    data = captioned_folder(tmp_path / "data")
    backbone = detect_backbone(str(tiny_sd3))
    settings = TrainSettings(pretrained_model_name_or_path=str(tiny_sd3), instance_data_dir=str(data), resolution=64,
                             instance_prompt="p", train_batch_size=3)
    encoders = Encoders(backbone, str(tiny_sd3), vae_path=None, device="cpu", text_dtype=torch.float32,
                        vae_dtype=torch.float32, max_sequence_length=48)
    loss = ValidationLoss(backbone, folder_examples(data, CaptionRules(instance_prompt="p")), settings, encoders, torch.float32)
    scheduler = backbone.load_scheduler(str(tiny_sd3))
    objective, schedule = backbone.objective(scheduler), backbone.noise_schedule(scheduler)
    model = backbone.load_denoiser(str(tiny_sd3))
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    first = loss(model, schedule, objective, contextlib.nullcontext)
    assert torch.equal(state, torch.random.get_rng_state())  # no global draws
    assert first == loss(model, schedule, objective, contextlib.nullcontext) and first > 0
    assert [len(latents) for latents, _ in loss.batches] == [3, 1]


# ---- aspect-ratio buckets --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd3", "flux", "sdxl"])
def test_bucketing_trains_each_image_at_its_aspect_with_one_bucket_per_batch(name, request, tmp_path, monkeypatch):
    model = request.getfixturevalue(f"tiny_{name}")
    backbone_class = type(BACKBONES[name])
    shapes, conds = [], []
    real_loss, real_cond = backbone_class.training_loss, backbone_class.batch_cond

    def loss_spy(self, denoiser, latents, *args, **kwargs):
        shapes.append(tuple(latents.shape))
        return real_loss(self, denoiser, latents, *args, **kwargs)

    def cond_spy(self, table, batch):
        conds.append({k: batch[k].tolist() for k in ("original_size", "crop_top_left", "target_size")})
        return real_cond(self, table, batch)
    monkeypatch.setattr(backbone_class, "training_loss", loss_spy)
    monkeypatch.setattr(backbone_class, "batch_cond", cond_spy)
    encoded = spy_prompts(monkeypatch, name)
    data = captioned_folder(tmp_path / "data", captions=("a red <c> box", "a green <c> box", "a blue <c> box", "a <c> box"))
    train(model, data, tmp_path / "run", "--enable_bucket", "--train_batch_size", "2", "--max_train_steps", "6",
          cache=tmp_path / "cache")
    record = json.loads((tmp_path / "run" / "dataset.json").read_text())
    buckets = {i["image"]: tuple(i["bucket"]) for i in record["images"]}  # (width, height)
    assert buckets == {"img0.png": (80, 48), "img1.png": (48, 80), "img2.png": (64, 64), "img3.png": (80, 48)}
    assert record["buckets"] == {"80x48": 2, "48x80": 1, "64x64": 1}
    vae_factor = 8
    seen = {(h * vae_factor, w * vae_factor) for _, _, h, w in shapes}  # the latents follow the bucket's shape
    assert seen == {(48, 80), (80, 48), (64, 64)}, seen
    for cond in conds:  # one bucket per batch; SDXL's size conditioning: the true source size, a rounding-only crop
        assert len({tuple(t) for t in cond["target_size"]}) == 1
        for original, crop, target in zip(cond["original_size"], cond["crop_top_left"], cond["target_size"]):
            assert tuple(original) in {(64, 96), (96, 64), (80, 80), (72, 128)}
            scale = max(target[0] / original[0], target[1] / original[1])
            assert crop[0] <= original[0] * scale - target[0] + 1 and crop[1] <= original[1] * scale - target[1] + 1
    assert encoded[0] == ["a red <c> box", "a green <c> box", "a blue <c> box", "a <c> box"]
    latents = cache_keys(tmp_path / "cache", "latents")
    assert sorted(tuple(k["bucket"]) for k in latents) == sorted(buckets.values())


def test_bucket_batches_are_seeded_and_one_bucket_each():
    from qrlora.training.buckets import bucket_batches, make_buckets, nearest_bucket

    buckets = make_buckets(512, 64)
    assert all(h % 64 == 0 and w % 64 == 0 and 0.7 * 512**2 < h * w < 1.3 * 512**2 for h, w in buckets)
    assert (512, 512) in buckets and nearest_bucket(720, 1280, buckets)[1] > nearest_bucket(720, 1280, buckets)[0]
    sizes = [(64, 64)] * 5 + [(48, 80)] * 3
    one = bucket_batches(sizes, 2, 0, 0, 0, 1)
    assert one == bucket_batches(sizes, 2, 0, 0, 0, 1) and one != bucket_batches(sizes, 2, 0, 1, 0, 1)
    assert all(len({sizes[i] for i in batch}) == 1 and len(batch) == 2 for batch in one)
    assert {i for batch in one for i in batch} == set(range(8))
    ranks = [bucket_batches(sizes, 2, 0, 0, r, 2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1])
