"""Training invariants of real runs (docs/ARCHITECTURE.md s. 3a) and the fixes of the learning issue, each a test.

Validation cannot change training; adapter state moves with the model; exactly --max_train_steps updates
with accumulation and a non-dividing dataset, resumed bit-exactly; per-copy augmentation; SDXL micro-conditioning,
negative prompt and EDM; Prodigy's recommended flags; VAE / base dtypes; cached latent distributions; the
logged loss is the update's mean.
"""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import sys
import types

import pytest
import torch
from PIL import Image

from conftest import REPO, run_script
from qrlora.backbones import BACKBONES
from qrlora.files.checkpoint import load_adapter
from qrlora.training.data import DreamBoothDataset, collate
from qrlora.core.inject import inject_adapters
from qrlora.core.layers import AdapterState, adapter_layers
from qrlora.core.methods import METHODS, AdapterConfig, get_method
from qrlora.training.settings import TrainSettings


def run_trainer(model, out, *extra, steps=4, images=REPO / "assets/cnt/cat"):
    from accelerate.state import AcceleratorState

    from qrlora.cli.train import main

    try:
        return main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
                     "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", str(steps),
                     "--output_dir", str(out), "--lora_init_method", "triu_deltaR", "--learning_rate", "1e-2",
                     "--mixed_precision", "no", *extra])
    finally:
        AcceleratorState._reset_state()


def assert_same_adapter(a_path, b_path):
    a, b = load_adapter(a_path), load_adapter(b_path)
    assert a.layers.keys() == b.layers.keys()
    for path, tensors in a.layers.items():
        for name, value in tensors.items():
            assert torch.equal(value, b.layers[path][name]), f"{path}.{name} differs"


# ---- 1. validation cannot steer training ------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["sd3", "flux", "sdxl"])
def test_validation_leaves_training_bit_identical(request, backbone, tmp_path):
    model = request.getfixturevalue(f"tiny_{backbone}")
    extra = ["--max_sequence_length", "16"] if backbone == "flux" else []
    plain = run_trainer(model, tmp_path / "plain", *extra, steps=6)
    validated = run_trainer(model, tmp_path / "validated", *extra, "--validation_prompt", "a <c> cat on the beach",
                            "--validation_epochs", "1", "--num_validation_images", "1", "--validation_inference_steps", "3",
                            steps=6)
    assert len(list((tmp_path / "validated" / "validation").glob("*.png"))) >= 2  # mid-run and final
    assert_same_adapter(plain, validated)


# ---- 2. every tensor an adapter uses is module state ------------------------------------------------------
class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.GELU(), torch.nn.Linear(16, 10))

    def forward(self, x):
        return self.proj(x)


def loose_tensors(module: torch.nn.Module) -> list[str]:
    """Tensors an adapter module holds outside its registered parameters and buffers."""
    found = []
    for owner, sub in module.named_modules():
        for name, value in vars(sub).items():
            values = value.values() if isinstance(value, dict) and not name.startswith("_") else [value]
            if any(isinstance(v, torch.Tensor) for v in values):
                found.append(f"{owner}.{name}")
    return found


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_state_moves_with_the_model(method):
    model = TwoLinears()
    inject_adapters(model, AdapterConfig(method=method, rank=4, num_experts=2, use_zero_init=False), ["proj.0", "proj.2"])
    x = torch.randn(3, 12)
    reference = model(x).detach()
    assert all(not loose_tensors(state) for _, layer in adapter_layers(model) for state in layer.adapters.values())

    # float64 and back: forward and backward work, masked entries get zero gradient, and values survive
    model.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in [*model.parameters(), *model.buffers()])
    model(x.double()).sum().backward()
    for _, layer in adapter_layers(model):
        state: AdapterState = layer.adapters["default"]
        for name in state.masked:
            grad = getattr(state, name).grad
            assert torch.count_nonzero(grad * (1 - state.mask(name, grad.dtype))) == 0
    model.to(torch.float32)
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-6)

    # another device (meta stands in for an accelerator): nothing stays behind, backward runs there
    model.to("meta")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert not left, f"left on the CPU: {left}"
    model.zero_grad(set_to_none=True)
    model(torch.randn(3, 12, device="meta")).sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


# ---- 3. exactly --max_train_steps updates; resume lands on the same position --------------------------------
@pytest.fixture
def five_images(tmp_path):
    folder = tmp_path / "five"
    folder.mkdir()
    sources = sorted((REPO / "assets/cnt/cat").glob("*.jpg")) + sorted((REPO / "assets/sty/swirl_painting").glob("*.jpg"))
    for i, src in enumerate(sources[:5]):
        shutil.copy(src, folder / f"{i}{src.suffix}")
    return folder


def test_accumulation_makes_exactly_max_train_steps_updates(tiny_sd3, five_images, tmp_path, monkeypatch):
    counted = {"n": 0}
    original = torch.optim.AdamW.step

    def counting(self, *a, **k):
        counted["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    run_trainer(tiny_sd3, tmp_path / "run", "--gradient_accumulation_steps", "4", "--lr_scheduler", "linear",
                images=five_images, steps=20)
    assert counted["n"] == 20


def test_resume_with_accumulation_and_a_non_dividing_dataset(tiny_sd3, five_images, tmp_path):
    flags = ["--gradient_accumulation_steps", "2", "--train_batch_size", "2", "--checkpointing_steps", "3",
             "--random_flip", "--lr_scheduler", "cosine"]
    straight = run_trainer(tiny_sd3, tmp_path / "a", *flags, images=five_images, steps=7)
    resumed_dir = tmp_path / "b"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = run_trainer(tiny_sd3, resumed_dir, *flags, "--resume_from_checkpoint", "latest", images=five_images, steps=7)
    assert_same_adapter(straight, resumed)


def test_logged_loss_is_the_mean_of_the_update(tiny_sd3, five_images, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from qrlora.backbones.base import Backbone

    micro, logged = [], []
    original_loss, original_log = Backbone.training_loss, Accelerator.log

    def spy_loss(self, *a, **k):
        loss = original_loss(self, *a, **k)
        micro.append(loss.detach().mean().item())
        return loss

    def spy_log(self, values, step=None, **k):
        logged.append(values["loss"])
        return original_log(self, values, step=step, **k)

    monkeypatch.setattr(Backbone, "training_loss", spy_loss)
    monkeypatch.setattr(Accelerator, "log", spy_log)
    run_trainer(tiny_sd3, tmp_path / "run", "--gradient_accumulation_steps", "2", images=five_images, steps=3)
    # 5 images, batches of 1, updates of 2 micro-batches: [2, 2, 1] per epoch
    assert len(micro) == 5 and len(logged) == 3
    expected = [(micro[0] + micro[1]) / 2, (micro[2] + micro[3]) / 2, micro[4]]
    assert logged == pytest.approx(expected, rel=1e-6)


# ---- 4. data and family details ----------------------------------------------------------------------------
def test_each_repeat_gets_its_own_crop_and_flip(tmp_path):
    Image.linear_gradient("L").rotate(90).resize((160, 96)).convert("RGB").save(tmp_path / "wide.png")  # varies along x
    data = DreamBoothDataset(tmp_path, resolution=64, repeats=6, random_flip=True, seed=0)
    copies = [data[i]["instance"] for i in range(6)]
    assert len({c.crop_top_left for c in copies}) > 1
    assert any(not torch.equal(copies[0].pixels, c.pixels) for c in copies[1:])


def test_sdxl_time_ids_are_each_images_size_and_crop(tmp_path):
    Image.linear_gradient("L").resize((150, 100)).convert("RGB").save(tmp_path / "a.png")
    data = DreamBoothDataset(tmp_path, resolution=64, seed=3)
    batch = collate([data[0]])
    item = data[0]["instance"]
    assert item.original_size == (100, 150) and item.target_size == (64, 64)
    cond = BACKBONES["sdxl"].batch_cond({"prompt_embeds": torch.zeros(1, 77, 8), "pooled_prompt_embeds": torch.zeros(1, 4)}, batch)
    top, left = item.crop_top_left
    assert cond["time_ids"].tolist() == [[100, 150, top, left, 64, 64]] and left > 0


def test_sdxl_validation_negative_is_zeros_as_the_pipeline_draws(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    text = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, unet=None, vae=None)
    assert text.config.force_zeros_for_empty_prompt
    negative = BACKBONES["sdxl"].negative_cond(text, "cpu", 77)
    assert all(torch.count_nonzero(v) == 0 for v in negative.values())
    assert negative["prompt_embeds"].shape[1] == 77


def test_sdxl_trains_at_1024_px_from_the_wrapper_and_from_qrlora_train_alike(tiny_sdxl, tiny_sd3, monkeypatch):
    """The backbone fills the resolution in Python, for the CLI and the wrappers alike (qrlora-train used to train
    SDXL at its own 512 px while the SDXL wrapper used 1024)."""
    from qrlora.cli.train import parse_args
    from qrlora.training import trainer

    flags = ["--instance_data_dir", "d", "--instance_prompt", "p"]
    assert parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl), *flags]).resolution == 1024
    assert parse_args(["--pretrained_model_name_or_path", str(tiny_sd3), *flags]).resolution == 512
    assert parse_args(["--pretrained_model_name_or_path", str(tiny_sdxl), *flags, "--resolution", "64"]).resolution == 64
    for wrapper, size in (("SDXL_dir/train_deltaR_sty.sh", 1024), ("SD3_dir/train_deltaR_sty.sh", 512)):
        command = shlex.split(run_script(["bash", wrapper, "cpu", "4"], env={"DRY_RUN": "1", "MODEL_NAME": "x"}).stdout)
        assert "--resolution" not in command and parse_args(command[3:]).resolution == size
    # Settings built by a program (no parser) get the same default when the trainer detects the backbone.
    seen = {}

    def stop(folder, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")
    monkeypatch.setattr(trainer, "folder_examples", lambda folder, rules: [])
    monkeypatch.setattr(trainer, "DreamBoothDataset", stop)
    with pytest.raises(RuntimeError, match="stop"):
        trainer.train(TrainSettings(pretrained_model_name_or_path=str(tiny_sdxl), instance_data_dir="d", instance_prompt="p"), "")
    assert seen["resolution"] == 1024


def test_prodigy_gets_the_recommended_flags_and_a_low_lr_warning(monkeypatch, caplog):
    from qrlora.training import trainer as train
    from qrlora.cli.train import parse_args

    seen = {}
    fake = types.ModuleType("prodigyopt")
    fake.Prodigy = lambda params, **kwargs: seen.update(kwargs) or "optimizer"
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    args = parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x", "--instance_prompt", "x",
                       "--optimizer", "prodigy", "--learning_rate", "1e-4"])
    with caplog.at_level(logging.WARNING, logger="qrlora.train"):
        assert train.build_optimizer(args, []) == "optimizer"
    assert seen["use_bias_correction"] and seen["safeguard_warmup"] and seen["decouple"]
    assert "around 1.0" in caplog.text


def test_vae_and_base_dtypes(tiny_sd3, tmp_path, monkeypatch):
    from qrlora.training import trainer as train
    from qrlora.backbones.base import Backbone

    seen = {}
    original = Backbone.training_loss

    def spy(self, denoiser, latents, *a, **k):
        seen["latents"] = latents.dtype
        seen["base"] = next(p.dtype for n, p in denoiser.named_parameters() if n.endswith("base_layer.weight"))
        return original(self, denoiser, latents, *a, **k)

    original_latents = train.batch_latents

    def spy_latents(backbone, vae, *a, **k):
        seen["vae"] = vae.dtype
        return original_latents(backbone, vae, *a, **k)

    monkeypatch.setattr(Backbone, "training_loss", spy)
    monkeypatch.setattr(train, "batch_latents", spy_latents)
    run_trainer(tiny_sd3, tmp_path / "a", "--base_precision", "bf16", steps=1)
    assert seen == {"vae": torch.float32, "latents": torch.bfloat16, "base": torch.bfloat16}
    run_trainer(tiny_sd3, tmp_path / "b", "--mixed_precision", "bf16", steps=1)
    assert seen["vae"] == torch.float32 and seen["base"] == torch.bfloat16  # SD3's VAE stays float32


def test_cached_latents_are_a_distribution_sampled_every_step(tiny_sd3):
    from diffusers import AutoencoderKL

    from qrlora.core.objective import step_generator
    from qrlora.training.trainer import batch_latents

    vae = AutoencoderKL.from_pretrained(tiny_sd3, subfolder="vae")
    data = DreamBoothDataset(REPO / "assets/cnt/cat", resolution=64, seed=0)
    data.cache(lambda px, **key: vae.encode(px).latent_dist.parameters)
    batch = collate([data[0]])
    assert batch["latent_params"].shape[1] == 2 * vae.config.latent_channels
    sd3 = BACKBONES["sd3"]
    one = batch_latents(sd3, vae, batch, step_generator(0, 1, 0, 0, "cpu"), torch.float32)
    again = batch_latents(sd3, vae, batch, step_generator(0, 1, 0, 0, "cpu"), torch.float32)
    other = batch_latents(sd3, vae, batch, step_generator(0, 2, 0, 0, "cpu"), torch.float32)
    assert torch.equal(one, again) and not torch.equal(one, other)


def test_masks_never_reach_files():
    config = AdapterConfig(method="triu_deltaR", rank=2)
    state = AdapterState(config, get_method("triu_deltaR").initialize(torch.randn(6, 5), config, "layer"))
    assert state.masked == ("delta_r",) and any("mask" in name for name, _ in state.named_buffers())
    assert not any("mask" in key for key in state.state_dict())
    assert set(state.tensors()) == set(get_method("triu_deltaR").tensor_names)


@pytest.mark.parametrize("wrapper", sorted(str(p.relative_to(REPO)) for d in ("SD3_dir", "flux_dir", "SDXL_dir")
                                           for p in (REPO / d).glob("train_*.sh")))
def test_wrapper_defaults_come_from_the_backbone_registry(wrapper):
    """Shell defaults (model id, resolution, run root, run-name layout) are the backbone class's, their one owner:
    the wrapper passes none of them, the trainer's parser fills them from the backbone."""
    from qrlora.cli.train import parse_args

    proc = run_script(["bash", wrapper, "cpu", "8"], env={"DRY_RUN": "1", "MODEL_NAME": "", "RESOLUTION": "", "OUTPUT_DIR": ""})
    command = shlex.split(proc.stdout)
    for flag in ("--pretrained_model_name_or_path", "--resolution", "--output_dir", "--learning_rate", "--seed"):
        assert flag not in command, flag  # the trainer's defaults, not repeated in the shell
    settings = parse_args(command[3:])
    backbone = BACKBONES[settings.backbone]
    assert settings.pretrained_model_name_or_path == backbone.default_model
    assert settings.resolution == backbone.default_resolution
    root, name = settings.output_dir.split("/")
    assert root == backbone.run_root
    method_part = f"-{re.escape(settings.lora_init_method)}" if backbone.run_name_has_method else ""
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}-[sc]-8-p\d+{method_part}", name), name


@pytest.mark.parametrize("wrapper", sorted(str(p.relative_to(REPO)) for d in ("SD3_dir", "flux_dir", "SDXL_dir")
                                           for p in (REPO / d).glob("inference*.sh")))
def test_merge_wrapper_defaults_come_from_the_backbone_registry(wrapper):
    """The merge wrappers' model id, steps and image size are their backbone class's (given adapters, so no run
    discovery; the folder names the family)."""
    backbone = BACKBONES[{"SD3_dir": "sd3", "flux_dir": "flux", "SDXL_dir": "sdxl"}[wrapper.split("/")[0]]]
    env = {"DRY_RUN": "1", "STYLE_LORA": "style.safetensors", "CONTENT_LORA": "content.safetensors",
           "MODEL_NAME": "", "STEPS": "", "HEIGHT": "", "WIDTH": ""}
    command = run_script(["bash", wrapper, "cpu"], env=env).stdout.split()
    assert command[command.index("--model_path") + 1] == backbone.default_model
    assert int(command[command.index("--num_inference_steps") + 1]) == backbone.default_inference_steps
    assert int(command[command.index("--height") + 1]) == int(command[command.index("--width") + 1]) == backbone.default_image_size


def test_the_wrappers_read_every_backbone_s_defaults_from_its_class():
    """``scripts/backbone_defaults.py`` reads the class literals without importing the package; its answer for each
    registered family equals the imported registry, it knows no family the registry lacks, and an unknown name is
    one line and exit 2."""
    import shlex

    script = str(REPO / "scripts" / "backbone_defaults.py")
    for name, backbone in BACKBONES.items():
        proc = run_script([sys.executable, script, name])
        values = dict(item.split("=", 1) for item in shlex.split(proc.stdout))
        assert values == {"DEFAULT_MODEL": backbone.default_model,
                          "DEFAULT_INFERENCE_STEPS": str(backbone.default_inference_steps),
                          "DEFAULT_SIZE": str(backbone.default_image_size)}
    residual = run_script(["bash", "flux_dir/save_flux_residual.sh", "cpu"], env={"DRY_RUN": "1", "MODEL_NAME": ""}).stdout.split()
    assert residual[residual.index("--model_path") + 1] == BACKBONES["flux"].default_model
    bad = run_script([sys.executable, script, "sd4"], check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: unknown BACKBONE 'sd4'; choose one of {', '.join(sorted(BACKBONES))}"


def test_train_settings_are_typed_frozen_and_checked_naming_the_flag():
    """The trainer takes ``TrainSettings`` (no namespace): every flag a field, a bad value refused naming its flag,
    and ``--scale_lr`` a computed learning rate, never a rewritten setting."""
    import dataclasses

    from qrlora.cli.train import build_parser, parse_args
    from qrlora.errors import UserError
    from qrlora.training.settings import TrainSettings

    actions = {a.dest: a for a in build_parser()._actions if a.dest not in ("help", "config")}  # --config: a file of them
    assert set(actions) == {f.name for f in dataclasses.fields(TrainSettings)}
    assert {f.name: f.default for f in dataclasses.fields(TrainSettings)} == {n: a.default for n, a in actions.items()}
    settings = parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x", "--instance_prompt", "x",
                           "--scale_lr", "--train_batch_size", "2", "--gradient_accumulation_steps", "3"])
    assert isinstance(settings, TrainSettings) and settings.scaled_learning_rate(2) == pytest.approx(1e-4 * 12)
    assert settings.learning_rate == 1e-4
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.learning_rate = 1.0
    with pytest.raises(UserError, match="--gradient_accumulation_steps must be a positive integer"):
        dataclasses.replace(settings, gradient_accumulation_steps=0)
    with pytest.raises(UserError, match="--pretrained_model_name_or_path is required"):
        TrainSettings()
    # A program's run records the command line that gives its settings, and that line parses back to them.
    line = dataclasses.replace(settings, use_zero_init=False, rank=8).command()
    assert parse_args(line.split()[3:]) == dataclasses.replace(settings, use_zero_init=False, rank=8)


def test_the_parser_is_built_from_the_settings_fields(monkeypatch):
    """One source per setting: each flag's help, choices and group are its field's metadata; the adapter fields'
    defaults are AdapterConfig's; one method makes the AdapterConfig; the value check runs once per parse."""
    import dataclasses

    from qrlora.cli.train import build_parser, parse_args
    from qrlora.training import settings as settings_module

    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    groups = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    for f in dataclasses.fields(TrainSettings):
        assert actions[f.name].help == f.metadata["help"] and groups[f.name] == f.metadata["group"], f.name
    assert actions["lora_init_method"].choices == list(METHODS) and actions["backbone"].choices == list(BACKBONES)
    assert build_parser().parse_args(["--optimizer", "Prodigy"]).optimizer == "prodigy"
    flags = ["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x", "--instance_prompt", "x"]
    assert parse_args(flags).adapter_config() == AdapterConfig()
    custom = parse_args(flags + ["--rank", "8", "--lora_alpha", "4", "--moe_num_experts", "4", "--seed", "3",
                                 "--lora_init_method", "triu_deltaR", "--qr_basis", "random", "--qr_basis_seed", "2"])
    assert custom.adapter_config() == AdapterConfig(method="triu_deltaR", rank=8, alpha=4.0, num_experts=4, seed=3,
                                                    basis="random", basis_seed=2)
    calls = []
    real = settings_module.flag_problem
    monkeypatch.setattr(settings_module, "flag_problem", lambda args: calls.append(1) or real(args))
    parse_args(flags)
    assert len(calls) == 1
