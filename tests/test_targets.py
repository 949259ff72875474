"""Default targets are layers the model uses: every adapted Linear gets a gradient in the first step."""
from __future__ import annotations

import pytest
import torch

from qrlora.backbones import BACKBONES
from qrlora.backbones.base import discarded_linears
from qrlora.errors import UserError
from qrlora.core.inject import find_target_modules, inject_adapters
from qrlora.core.layers import adapter_layers
from qrlora.core.methods import AdapterConfig


@pytest.fixture
def tiny(request):
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.mark.parametrize("tiny", ["sd3", "flux", "sdxl"], indirect=True)
def test_every_default_target_gets_a_gradient_in_the_first_step(tiny):
    """One training step through the backbone's own loss on a tiny pipeline: no adapted layer may be dead."""
    backbone = BACKBONES[tiny.name]
    parts = backbone.load(str(tiny))
    denoiser = parts.denoiser
    report = inject_adapters(denoiser, AdapterConfig(method="deltaR", rank=2), backbone.default_targets)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        table = backbone.encode_prompts(parts.text_pipeline, ["a photo of a cat"], "cpu",
                                        backbone.default_max_sequence_length)
        latents = backbone.latents_from_pixels(parts.vae, torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1, gen)
    batch = {"prompt_ids": torch.zeros(1, dtype=torch.long), "original_size": torch.tensor([[64, 64]]),
             "crop_top_left": torch.tensor([[0, 0]]), "target_size": torch.tensor([[64, 64]])}
    cond = backbone.batch_cond(table, batch)  # SDXL adds its micro-conditioning from the batch; others ignore it
    objective = backbone.objective(parts.scheduler)
    loss = backbone.training_loss(denoiser, latents, cond, backbone.noise_schedule(parts.scheduler), objective, gen)
    loss.mean().backward()
    dead = [name for name, layer in adapter_layers(denoiser)
            if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters() if p.requires_grad)]
    assert report.layers and not dead, f"{len(dead)} of {len(report.layers)} adapted layers got no gradient: {dead}"


def test_sd3_last_block_context_query_is_not_a_target(tiny_sd3):
    """SD3's last joint block is ``context_pre_only``: its add_q_proj output is discarded, so it is skipped."""
    denoiser = BACKBONES["sd3"].load_denoiser(str(tiny_sd3))
    blocks = denoiser.transformer_blocks
    last = f"transformer_blocks.{len(blocks) - 1}.attn.add_q_proj"
    assert blocks[-1].context_pre_only and discarded_linears(denoiser) == {last}
    paths = find_target_modules(denoiser, BACKBONES["sd3"].default_targets)
    # 8 projections per joint block; the last has no to_add_out (diffusers) and a discarded add_q_proj (here)
    assert last not in paths and len(paths) == 8 * len(blocks) - 2
    assert len(find_target_modules(denoiser, ["attn.add_q_proj"])) == len(blocks) - 1
    with pytest.raises(UserError, match="discards"):
        find_target_modules(denoiser, [last])


@pytest.mark.parametrize("tiny", ["flux", "sdxl"], indirect=True)
def test_flux_and_sdxl_discard_nothing(tiny):
    backbone = BACKBONES[tiny.name]
    assert discarded_linears(backbone.load_denoiser(str(tiny))) == set()
