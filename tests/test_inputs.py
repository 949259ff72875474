"""What a newcomer types: help and defaults, prompts the tokenizers would cut, the last bad inputs (one line each),
transparent images, the model card's snippets, the published wrapper defaults, and a quiet run."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_adapter, one_error, run_script

WORLD = REPO / "assets" / "world"
TRUNCATED_ON_THE_WORLD = "a landscape in <s> style"  # the wrappers' style prompt: CLIP keeps 10 tokens there
LOST_ON_THE_WORLD = "e in < s > style"


# ---- --help ----------------------------------------------------------------------------------------------------
def test_every_trainer_flag_has_help_and_shows_its_default():
    from qrlora.cli.train import build_parser

    parser = build_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps lines; compare with single spaces
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[0]
        assert action.help, f"{flag} has no help text"
        help_text = " ".join(parser.formatter_class(parser.prog)._get_help_string(action).split())
        assert help_text in text, flag
        if action.default is not None and action.default is not False:
            assert "default" in help_text and (str(action.default) in help_text or "default:" in help_text), (flag, help_text)
    for flag, shown in (("--rank", "(default: 4)"), ("--learning_rate", "(default: 0.0001)"),
                        ("--lr_warmup_steps", "(default: 0)"), ("--validation_epochs", "(default: 50)")):
        assert flag in text and shown in text, flag


# ---- flags refused before anything loads -------------------------------------------------------------------------
@pytest.mark.parametrize("flags,expect", [
    (["--lora_layers", ""], "--lora_layers '' names no layer"),
    (["--lora_layers", " , "], "names no layer"),
    (["--lora_layers", "to_q,,to_k"], "--lora_layers 'to_q,,to_k' has an empty entry"),
    (["--lora_blocks", "transformer_blocks.0,"], "--lora_blocks 'transformer_blocks.0,' has an empty entry"),
    (["--learning_rate", "1e39"], "--learning_rate 1e+39 is above float32's largest value"),
    (["--learning_rate", "1e300"], "--learning_rate 1e+300 is above float32's largest value"),
    (["--adam_epsilon", "1e40"], "--adam_epsilon"),
])
def test_trainer_refuses_before_loading(flags, expect, tmp_path, capsys):
    from qrlora.cli.train import main

    out = tmp_path / "run"
    line = one_error(capsys, lambda: main(["--pretrained_model_name_or_path", str(tmp_path / "no-model"),
                                           "--instance_data_dir", "d", "--instance_prompt", "p", "--output_dir", str(out), *flags]))
    assert expect in line, line
    assert not out.exists()


def test_instance_data_dir_naming_a_file_says_so(tmp_path, capsys):
    from qrlora.cli.train import main

    image = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(image)
    line = one_error(capsys, lambda: main(["--pretrained_model_name_or_path", "m", "--instance_data_dir", str(image),
                                           "--instance_prompt", "p"]))
    assert f"--instance_data_dir {image} is a file; give the folder that holds the images" in line


def test_world_supplies_its_prompt_length_and_resolution():
    from qrlora.cli.train import parse_args
    from qrlora.toy.world.world import load_world

    world = load_world(WORLD)
    base = ["--pretrained_model_name_or_path", str(WORLD), "--instance_data_dir", "d", "--instance_prompt", "p"]
    args = parse_args(base)
    assert (args.max_sequence_length, args.resolution) == (world.max_sequence_length, world.resolution) == (8, 32)
    args = parse_args(base + ["--max_sequence_length", "16", "--resolution", "64"])  # flags still win
    assert (args.max_sequence_length, args.resolution) == (16, 64)
    args = parse_args(["--pretrained_model_name_or_path", "elsewhere", "--instance_data_dir", "d", "--instance_prompt", "p"])
    # Not a pipeline the parser can read: the trainer fills the backbone's length and resolution once it detects it.
    assert (args.max_sequence_length, args.resolution) == (None, None)


def test_instance_prompt_the_tokenizer_cuts_is_refused_naming_the_words(tmp_path, capsys):
    from qrlora.cli.train import main
    from qrlora.toy.world.world import write_instance_images

    data = write_instance_images(tmp_path / "data", "heart", "flat", count=1)
    out = tmp_path / "run"
    line = one_error(capsys, lambda: main(["--pretrained_model_name_or_path", str(WORLD), "--instance_data_dir", str(data),
                                           "--instance_prompt", TRUNCATED_ON_THE_WORLD, "--output_dir", str(out)]))
    assert f"would drop '{LOST_ON_THE_WORLD}'" in line and "--instance_prompt" in line, line
    assert not out.exists()  # refused before the run folder is made


def test_lost_words_counts_the_special_tokens():
    from qrlora.core.prompts import load_tokenizers, lost_words

    tokenizers = load_tokenizers(str(WORLD))
    clip, t5 = tokenizers["tokenizer"], tokenizers["tokenizer_3"]
    assert lost_words(clip, "a heart in flat style", 8) is None
    assert lost_words(clip, TRUNCATED_ON_THE_WORLD, 8) == LOST_ON_THE_WORLD
    # T5 keeps max_sequence_length tokens including its EOS: 5 words fit in 6, not in 5
    assert lost_words(t5, "a heart in flat style", 6) is None
    assert lost_words(t5, "a heart in flat style", 5) == "style"


# ---- merge weights --------------------------------------------------------------------------------------------
def test_negative_weights_parse_and_empty_entries_are_refused(tmp_path, capsys):
    from qrlora.cli.merge import grid_parser, merge_main, merge_parser

    base = ["--model_path", "m", "--adapters", "a", "b"]
    assert merge_parser().parse_args(base + ["--weights", "-1,2"]).weights == "-1,2"
    assert merge_parser().parse_args(base + ["--weights", "-0.5e-1,.5"]).weights == "-0.5e-1,.5"
    grid = grid_parser("d").parse_args(["--model_path", "m", "--style_lora_path", "s", "--content_lora_path", "c",
                                        "--style_weights", "-1,0,1"])
    assert grid.style_weights == "-1,0,1"
    line = one_error(capsys, lambda: merge_main(base + ["--weights", "1,,1"]))
    assert "--weights: entry 2 of '1,,1' is empty" in line, line
    line = one_error(capsys, lambda: merge_main(base + ["--weights", "1,x"]))
    assert "'x' (entry 2 of '1,x') is not a number" in line, line


# ---- export -----------------------------------------------------------------------------------------------------
def test_export_refuses_a_folder_as_output_up_front(tmp_path, capsys):
    from qrlora.cli.export import main

    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("user's file")
    # the input does not even exist: the folder is refused first, --overwrite or not
    for extra in ([], ["--overwrite"]):
        line = one_error(capsys, lambda: main([str(tmp_path / "missing.safetensors"), str(folder), *extra]))
        assert line == f"error: {folder} is a folder; give the path of the LoRA file to write (e.g. {folder / 'lora.safetensors'})"
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


# ---- RGBA images ---------------------------------------------------------------------------------------------
def test_transparent_pixels_become_white(tmp_path):
    from qrlora.training.data import load_image

    rgba = np.zeros((8, 8, 4), np.uint8)  # transparent black background
    rgba[2:6, 2:6] = (200, 10, 10, 255)  # an opaque red square
    rgba[0, 0] = (0, 0, 255, 128)  # half-transparent blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "logo.png")
    got = np.asarray(load_image(tmp_path / "logo.png"))
    assert got.shape == (8, 8, 3)
    assert (got[7, 7] == 255).all() and (got[3, 3] == (200, 10, 10)).all()
    assert abs(int(got[0, 0, 0]) - 127) <= 1 and got[0, 0, 2] == 255
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0  # index 0 (black) is transparent
    palette.save(tmp_path / "palette.png", transparency=0)
    got = np.asarray(load_image(tmp_path / "palette.png"))
    assert (got[0, 0] == 255).all() and (got[1, 1] == (0, 255, 0)).all()


# ---- model card ---------------------------------------------------------------------------------------------
def test_model_card_snippets_use_the_runs_settings(tiny_sd3, tmp_path):
    import diffusers

    from qrlora.files.checkpoint import load_adapter
    from qrlora.files.model_card import render_model_card, card_snippet_settings

    adapter = load_adapter(make_adapter(tiny_sd3, "sd3", tmp_path / "a.safetensors"))
    settings = card_snippet_settings(diffusers.StableDiffusion3Pipeline, mixed_precision="no", device="cpu",
                                     resolution=32, max_sequence_length=8)
    card = str(render_model_card(adapter, adapter_name="a.safetensors", pipeline_class="StableDiffusion3Pipeline",
                                 command="python -m qrlora.train ...", settings=settings))
    assert "torch_dtype=torch.float32).to('cpu')" in card and "bfloat16" not in card and "cuda" not in card
    assert "height=32, width=32, max_sequence_length=8" in card
    assert "--height 32 --width 32 --dtype float32 --device cpu --max_sequence_length 8" in card
    sdxl = card_snippet_settings(diffusers.StableDiffusionXLPipeline, mixed_precision="bf16", device="cuda",
                                 resolution=1024, max_sequence_length=77)
    assert (sdxl.dtype, sdxl.max_sequence_length) == ("bfloat16", None)  # SDXL's pipeline takes no T5 length


# ---- wrappers ---------------------------------------------------------------------------------------------------
def test_training_wrapper_uses_the_published_accumulation():
    proc = run_script(["bash", "SD3_dir/train_deltaR_sty.sh", "cpu", "4"], env={"DRY_RUN": "1"})
    assert "--gradient_accumulation_steps 4" in proc.stdout  # batch 1 is the trainer's default, not repeated


def test_similarity_comparison_prints_its_final_path(tiny_sd3, tmp_path, capsys):
    from qrlora.evaluation.analysis.similarity import run_compare

    files = [make_adapter(tiny_sd3, "sd3", tmp_path / f"{m}{s}.safetensors", method=m, seed=s)
             for m in ("triu_deltaR", "lora") for s in (0, 1)]
    out = tmp_path / "cmp"
    run_compare(files[:2], files[2:], out, progress=False, dpi=20)
    printed = capsys.readouterr().out
    assert f"wrote {out / 'dW_comparison.json'} and the figure" in printed and (out / "dW_comparison.json").is_file()
    assert ".tmp" not in printed


# ---- a quiet run --------------------------------------------------------------------------------------------
NOISE = ("Repo card metadata block", "requires torchvision", "torch_dtype", "should be kept in float32",
         "Token indices sequence length", "The following part of your input was truncated", "FutureWarning")


def test_a_run_says_each_thing_once(tmp_path):
    """A short world run whose validation prompt CLIP cuts: none of the third-party noise, the cut said once; with
    ``CI=1`` too, where transformers sends its records to the root logger as well."""
    from qrlora.toy.world.world import write_instance_images

    data = write_instance_images(tmp_path / "data", "heart", "flat", count=4)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CI": "1"}
    proc = subprocess.run([sys.executable, "-m", "qrlora.train", "--pretrained_model_name_or_path", str(WORLD),
                           "--instance_data_dir", str(data), "--instance_prompt", "a heart in flat style",
                           "--validation_prompt", TRUNCATED_ON_THE_WORLD, "--num_validation_images", "1",
                           "--validation_inference_steps", "1", "--train_batch_size", "4", "--max_train_steps", "1",
                           "--output_dir", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert [n for n in NOISE if n in err] == [], err
    assert err.count(LOST_ON_THE_WORLD) == 1 and "--validation_prompt" in err, err
    card = (tmp_path / "run" / "README.md").read_text()
    assert "--max_sequence_length 8" in card and "--height 32" in card  # the world's own defaults reached the card
