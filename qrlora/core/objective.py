"""One training step's loss, shared by the trainer, the benchmarks and the tests (docs/ARCHITECTURE.md s. 3a).

The loss is a function of the denoiser, a batch (latents + conditioning), a frozen *noise schedule* and a small
typed ``Objective``; never of the argparse namespace, and never of a scheduler object someone else can mutate.
Why the schedule is frozen: diffusers' pipelines call ``scheduler.set_timesteps(n)`` on the scheduler they are
given, which replaces ``timesteps`` / ``sigmas`` in place. Handing the trainer's scheduler to a validation
pipeline used to shrink the training table to ``n`` entries (diffusers' scripts keep ``noise_scheduler_copy``
for the same reason). ``NoiseSchedule`` copies the tensors once, at load time, so nothing can reach them.

Randomness (timestep draw, noise, VAE latent sample) comes only from the ``generator`` the caller passes. The
trainer seeds one per micro-batch from (seed, step, micro-batch, process), so a run's training draws depend
on nothing else: not on validation, not on how many processes saved RNG files, not on resume.

Families (each restated independently in ``tests/test_objective.py`` from diffusers' DreamBooth scripts):

* flow matching (SD3, Esser et al. 2024; FLUX): ``u ~ density(weighting_scheme)``,
  ``i = floor(u * T)``, ``t = timesteps[i]``, ``sigma = sigmas[i]``, ``x_t = (1 - sigma) x_0 + sigma e``;
  target ``e - x_0`` (velocity), or with ``precondition_outputs`` the model output is mapped to
  ``x_0_hat = x_t - sigma v`` and compared with ``x_0``; weighted by ``compute_loss_weighting_for_sd3``.
* DDPM (SDXL, Podell et al. 2023): ``t ~ U{0..T-1}``, ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e``, target ``e``
  (epsilon) or ``v = sqrt(a_t) e - sqrt(1 - a_t) x_0`` (v_prediction), optionally min-SNR-gamma weighted
  (Hang et al. 2023, eq. 8 in the epsilon / v parametrisations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ..errors import UserError

Cond = dict[str, torch.Tensor]
# (noisy latents (B, C, h, w), timesteps (B,), conditioning) -> model output (B, C, h, w)
Predict = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
PREDICTION_TYPES = ("flow", "epsilon", "v_prediction")


@dataclass(frozen=True)
class Objective:
    """What the loss is; the backbone supplies the defaults (``Backbone.objective``), flags override them.

    ``prediction_type`` is ``flow`` for SD3 / FLUX and the scheduler's ``epsilon`` / ``v_prediction`` for SDXL.
    """

    prediction_type: str = "flow"
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    guidance_scale: float = 1.0
    snr_gamma: float | None = None

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"prediction type '{self.prediction_type}' is not supported for training "
                            f"(one of {', '.join(PREDICTION_TYPES)})")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(f"--weighting_scheme: unknown scheme '{self.weighting_scheme}'")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(f"--snr_gamma must be a positive number, got {self.snr_gamma}")

    @property
    def flow(self) -> bool:
        return self.prediction_type == "flow"


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise table, copied once: flow matching's ``timesteps`` / ``sigmas`` (T,), or DDPM's
    ``alphas_cumprod`` (T,). Immutable by construction (see module docstring)."""

    num_train_timesteps: int
    timesteps: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None
    alphas_cumprod: torch.Tensor | None = None

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        """Snapshot a freshly loaded diffusers scheduler (FlowMatchEulerDiscrete or any beta-schedule one)."""
        n = int(scheduler.config.num_train_timesteps)
        if hasattr(scheduler, "alphas_cumprod"):
            return cls(n, alphas_cumprod=scheduler.alphas_cumprod.detach().clone().float())
        return cls(n, timesteps=scheduler.timesteps.detach().clone(), sigmas=scheduler.sigmas.detach().clone())


def loss_per_sample(predict: Predict, latents: torch.Tensor, cond: Cond, schedule: NoiseSchedule,
                    objective: Objective, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training loss of each sample, shape (B,), for clean ``latents`` (B, C, h, w).

    ``predict`` is the backbone's call of the denoiser (``Backbone.predictor``); all draws use ``generator``.
    """
    bsz, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if objective.flow:
        u = compute_density_for_timestep_sampling(
            weighting_scheme=objective.weighting_scheme, batch_size=bsz, logit_mean=objective.logit_mean,
            logit_std=objective.logit_std, mode_scale=objective.mode_scale, device=device, generator=generator)
        indices = (u * schedule.num_train_timesteps).long().clamp_max(schedule.num_train_timesteps - 1).cpu()
        return flow_loss_at(predict, latents, noise, cond, schedule, objective, indices)
    timesteps = torch.randint(0, schedule.num_train_timesteps, (bsz,), generator=generator, device=device)
    return ddpm_loss_at(predict, latents, noise, cond, schedule, objective, timesteps.long())


def flow_loss_at(predict: Predict, latents, noise, cond, schedule: NoiseSchedule, objective: Objective,
                 indices: torch.Tensor) -> torch.Tensor:
    """Flow-matching loss (B,) at schedule ``indices`` (B,) with the given ``noise``."""
    bsz = latents.shape[0]
    timesteps = schedule.timesteps[indices].to(latents.device)
    sigmas = schedule.sigmas[indices].to(latents.device, latents.dtype).view(bsz, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pred = predict(noisy, timesteps, cond)
    if objective.precondition_outputs:
        pred, target = pred * (-sigmas) + noisy, latents  # x_0 = x_t - sigma v
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=objective.weighting_scheme, sigmas=sigmas)
    return (weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(dim=1)


def ddpm_loss_at(predict: Predict, latents, noise, cond, schedule: NoiseSchedule, objective: Objective,
                 timesteps: torch.Tensor) -> torch.Tensor:
    """DDPM epsilon / v loss (B,) at integer ``timesteps`` (B,), min-SNR weighted when ``snr_gamma`` is set."""
    bsz = latents.shape[0]
    alphas = schedule.alphas_cumprod.to(latents.device)[timesteps].float().view(bsz, 1, 1, 1)
    sqrt_a, sqrt_1ma = alphas.sqrt().to(latents.dtype), (1 - alphas).sqrt().to(latents.dtype)
    noisy = sqrt_a * latents + sqrt_1ma * noise
    target = noise if objective.prediction_type == "epsilon" else sqrt_a * noise - sqrt_1ma * latents
    pred = predict(noisy, timesteps, cond)
    loss = ((pred.float() - target.float()) ** 2).reshape(bsz, -1).mean(dim=1)
    if objective.snr_gamma is None:
        return loss
    # Min-SNR-gamma as the paper defines it (Hang et al., 2023, s. 3.4): min(snr, gamma) / snr for epsilon
    # (written min(1, gamma / snr) so a zero-terminal-SNR step weighs 1 instead of 0/0) and
    # min(snr, gamma) / (snr + 1) for v. diffusers' DreamBooth / text-to-image scripts differ for v: they use
    # min(snr, gamma) / snr + 1; we follow the paper.
    snr = (alphas / (1 - alphas)).view(bsz)
    if objective.prediction_type == "epsilon":
        return loss * (objective.snr_gamma / snr).clamp(max=1.0)
    return loss * snr.clamp(max=objective.snr_gamma) / (snr + 1)


def step_generator(seed: int, step: int, micro: int, process: int, device) -> torch.Generator:
    """The generator of one micro-batch's draws: a function of (seed, optimizer step, micro-batch, process) only."""
    mixed = (seed * 1_000_003 + step) * 1_009 + micro
    mixed = mixed * 65_537 + process
    return torch.Generator(device=device).manual_seed(mixed % (2**63 - 1))


@torch.no_grad()
def evaluation_loss(predict: Predict, latents: torch.Tensor, cond: Cond, schedule: NoiseSchedule,
                    objective: Objective, fractions=(0.1, 0.25, 0.4, 0.55, 0.7, 0.85), seed: int = 1234) -> float:
    """Fixed-noise evaluation loss: the unweighted loss at fixed noise levels with fixed noise, averaged.

    ``fractions`` in (0, 1) pick the noise levels (a sigma index / timestep at that fraction of the table), so
    the number depends only on the model: it is what tests and ``bench/convergence.py`` watch fall.
    """
    plain = Objective(prediction_type=objective.prediction_type, precondition_outputs=objective.precondition_outputs,
                      guidance_scale=objective.guidance_scale)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    total = 0.0
    for fraction in fractions:
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
        index = torch.full((latents.shape[0],), int(fraction * schedule.num_train_timesteps), dtype=torch.long)
        if plain.flow:
            total += flow_loss_at(predict, latents, noise, cond, schedule, plain, index).mean().item()
        else:
            total += ddpm_loss_at(predict, latents, noise, cond, schedule, plain, index.to(latents.device)).mean().item()
    return total / len(fractions)
