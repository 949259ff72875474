"""The shared training step equals diffusers' DreamBooth reference formulas on fixed inputs.

Each reference below is restated from ``examples/dreambooth/train_dreambooth_lora_{sd3,flux,sdxl}.py`` with
diffusers' own helpers (``get_sigmas`` lookup, ``FluxPipeline._pack_latents``, ``DDPMScheduler.add_noise``),
independently of ``qrlora.core.objective``; both sides draw from generators with the same seed in the reference's
order (noise, then timesteps), and call the real tiny denoisers.
"""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import (DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel)
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3, compute_snr

from qrlora.backbones import BACKBONES
from qrlora.errors import UserError
from qrlora.core.objective import WEIGHTING_SCHEMES, NoiseSchedule, Objective

SEED = 7


def gen():
    return torch.Generator().manual_seed(SEED)


def reference_flow_loss(call, latents, scheduler, weighting_scheme, precondition):
    """diffusers' SD3 / FLUX DreamBooth loss: noise, density, ``get_sigmas`` by timestep lookup, weighting."""
    g = gen()
    noise = torch.randn(latents.shape, generator=g)
    u = compute_density_for_timestep_sampling(weighting_scheme=weighting_scheme, batch_size=latents.shape[0],
                                              logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=g)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pred = call(noisy, timesteps)
    if precondition:
        pred = pred * (-sigmas) + noisy
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = latents if precondition else noise - latents
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(latents.shape[0], -1), 1)


@pytest.fixture
def flow_scheduler(tiny_sd3):
    """A fresh scheduler for each test (the SD3 test mutates it the way a validation pipeline would)."""
    return FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3, subfolder="scheduler")


@pytest.mark.parametrize("precondition", [True, False])
@pytest.mark.parametrize("scheme", WEIGHTING_SCHEMES)
def test_sd3_loss_equals_reference(tiny_sd3, flow_scheduler, scheme, precondition):
    sd3 = BACKBONES["sd3"]
    denoiser = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer").eval()
    latents = torch.randn(3, denoiser.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = denoiser.config
    cond = {"prompt_embeds": torch.randn(3, 5, cfg.joint_attention_dim), "pooled_prompt_embeds": torch.randn(3, cfg.pooled_projection_dim)}
    objective = sd3.objective(flow_scheduler, weighting_scheme=scheme, precondition_outputs=precondition)
    schedule = sd3.noise_schedule(flow_scheduler)
    flow_scheduler.set_timesteps(28)  # what a validation pipeline does to its scheduler: the copy must not see it
    ours = sd3.training_loss(denoiser, latents, cond, schedule, objective, gen())
    reference_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3, subfolder="scheduler")

    def call(noisy, timesteps):
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]

    with torch.no_grad():
        expected = reference_flow_loss(call, latents, reference_scheduler, scheme, precondition)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=1e-6)


def test_sd3_defaults_are_diffusers_defaults(flow_scheduler):
    objective = BACKBONES["sd3"].objective(flow_scheduler)
    assert (objective.weighting_scheme, objective.precondition_outputs, objective.flow) == ("logit_normal", True, True)
    assert BACKBONES["sd3"].vae_in_float32 and BACKBONES["sdxl"].vae_in_float32 and not BACKBONES["flux"].vae_in_float32


def test_flux_loss_equals_reference_packing_ids_guidance(tiny_flux):
    flux = BACKBONES["flux"]
    denoiser = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer").eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux, subfolder="scheduler")
    b, c, h, w = 2, denoiser.config.in_channels // 4, 8, 6
    latents = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(2))
    cfg = denoiser.config
    text_ids = torch.zeros(4, 3)
    cond = {"prompt_embeds": torch.randn(b, 4, cfg.joint_attention_dim), "pooled_prompt_embeds": torch.randn(b, cfg.pooled_projection_dim),
            "text_ids": text_ids}
    objective = flux.objective(scheduler, guidance_scale=3.5)
    assert (objective.weighting_scheme, objective.precondition_outputs) == ("none", False)
    ours = flux.training_loss(denoiser, latents, cond, flux.noise_schedule(scheduler), objective, gen())

    def call(noisy, timesteps):
        # diffusers' FLUX script: pack 2x2 patches, latent ids at half resolution, guidance embedded, t / 1000.
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", noisy.dtype)
        guidance = torch.tensor([3.5]).expand(b) if cfg.guidance_embeds else None
        pred = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                        pooled_projections=cond["pooled_prompt_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                        txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
        vae_scale_factor = 8  # _unpack_latents works in pixel units: latent size * vae scale factor
        return FluxPipeline._unpack_latents(pred, h * vae_scale_factor, w * vae_scale_factor, vae_scale_factor)

    with torch.no_grad():
        expected = reference_flow_loss(call, latents, scheduler, "none", False)
    assert cfg.guidance_embeds
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [None, 5.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sdxl_loss_equals_reference(tiny_sdxl, prediction_type, gamma):
    sdxl = BACKBONES["sdxl"]
    config = json.loads((tiny_sdxl / "scheduler" / "scheduler_config.json").read_text())
    scheduler = EulerDiscreteScheduler.from_config({**config, "prediction_type": prediction_type})
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").eval()
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    embeds = torch.randn(4, 77, unet.config.cross_attention_dim)
    pooled = torch.randn(4, unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim)
    batch = {"prompt_ids": torch.zeros(4, dtype=torch.long), "original_size": torch.tensor([[96, 80]] * 4),
             "crop_top_left": torch.tensor([[3, 9]] * 4), "target_size": torch.tensor([[64, 64]] * 4)}
    cond = sdxl.batch_cond({"prompt_embeds": embeds[:1], "pooled_prompt_embeds": pooled[:1]}, batch)
    cond["prompt_embeds"], cond["pooled_prompt_embeds"] = embeds, pooled
    objective = sdxl.objective(scheduler, snr_gamma=gamma)
    assert objective.prediction_type == prediction_type
    ours = sdxl.training_loss(unet, latents, cond, sdxl.noise_schedule(scheduler), objective, gen())

    # diffusers' SDXL DreamBooth script with a DDPM scheduler of the same betas; min-SNR as the paper states it.
    ddpm = DDPMScheduler.from_config(scheduler.config)
    g = gen()
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, ddpm.config.num_train_timesteps, (4,), generator=g).long()
    noisy = ddpm.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else ddpm.get_velocity(latents, noise, timesteps)
    time_ids = torch.tensor([[96, 80, 3, 9, 64, 64]] * 4, dtype=embeds.dtype)
    with torch.no_grad():
        pred = unet(noisy, timesteps, embeds, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled}).sample
    expected = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = compute_snr(ddpm, timesteps)
        expected = expected * torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-6)


def test_sdxl_refuses_edm_and_unknown_prediction_types(tiny_sdxl):
    sdxl = BACKBONES["sdxl"]
    edm = EDMEulerScheduler()
    with pytest.raises(UserError, match="EDM schedule"):
        sdxl.objective(edm)
    with pytest.raises(UserError, match="EDM schedule"):
        sdxl.noise_schedule(edm)
    config = json.loads((tiny_sdxl / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(UserError, match="prediction_type 'sample'"):
        sdxl.objective(EulerDiscreteScheduler.from_config({**config, "prediction_type": "sample"}))


def test_noise_schedule_is_a_copy_no_pipeline_can_mutate(flow_scheduler):
    fresh = FlowMatchEulerDiscreteScheduler.from_config(flow_scheduler.config)
    schedule = NoiseSchedule.from_scheduler(fresh)
    before = (schedule.timesteps.clone(), schedule.sigmas.clone())
    fresh.set_timesteps(3)
    assert torch.equal(schedule.timesteps, before[0]) and torch.equal(schedule.sigmas, before[1])
    assert len(schedule.sigmas) == fresh.config.num_train_timesteps


def test_objective_validates_its_fields():
    with pytest.raises(UserError, match="snr_gamma"):
        Objective(prediction_type="epsilon", snr_gamma=0.0)
    with pytest.raises(UserError, match="prediction type"):
        Objective(prediction_type="sample")
