"""bench/flux_memory.py: the fake-tensor storage tracker checked against a real CPU run, and the bench on a small
FLUX config (its FLUX.1-dev numbers are not asserted here: they live in bench/reports/flux_memory.json)."""
from __future__ import annotations

import pytest
from conftest import REPO
import torch

from bench import flux_memory as F

# A small FLUX transformer (every layer kind of the real one, width 64) that runs for real in well under a second.
SMALL = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
             axes_dims_rope=(4, 6, 6))
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_LEN = 8


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _real_forward_truth(setting: F.Setting) -> dict:
    """What a real run allocates: the parameters' and buffers' storages, and after the forward the storages the
    autograd graph saved (``saved_tensors_hooks``; with checkpointing, the blocks' inputs it keeps instead) plus
    the inputs and the loss - nothing else is alive then."""
    from torch.utils._pytree import tree_leaves

    from qrlora.backbones import BACKBONES
    from qrlora.core.objective import Objective

    model, _, schedule = F.prepared_model(SMALL, setting, TARGETS, fake=False)
    if setting.checkpointing:
        model.enable_gradient_checkpointing()
    param_tensors = list(model.parameters()) + list(model.buffers())
    param_ptrs = {t.untyped_storage().data_ptr() for t in param_tensors}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved.append(t)
        return t

    def keep_inputs(module, args, kwargs):  # what non-reentrant checkpointing holds instead of saved tensors
        if torch.is_grad_enabled():
            saved.extend(t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))

    if setting.checkpointing:
        for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
            block.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    latents, cond = F.make_inputs(SMALL, setting.resolution, TEXT_LEN)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = BACKBONES["flux"].training_loss(model, latents, cond, schedule,
                                               Objective(prediction_type="flow", guidance_scale=3.5),
                                               torch.Generator().manual_seed(1)).mean()
    alive = saved + [latents, loss, *cond.values()]
    return {"params": _storage_bytes(param_tensors), "activations": _storage_bytes(alive), "saved": len(saved)}


@pytest.mark.parametrize("method,checkpointing", [("triu_deltaR", False), ("triu_deltaR", True), ("peft_lora", False)])
def test_tracker_estimate_matches_the_tensors_a_real_run_allocates(method, checkpointing):
    setting = F.Setting("bf16", 64, 4, checkpointing, method)
    estimate = F.measure_step(F.prepared_model(SMALL, setting, TARGETS, fake=True), SMALL, setting,
                              text_len=TEXT_LEN, block=1)
    truth = _real_forward_truth(setting)
    assert truth["saved"] > 0
    after = estimate["after_forward"]
    assert after["params"] == truth["params"]
    assert after["activations"] == truth["activations"]
    # The same tracker on the real tensors of a real step sees the same storages, peak included.
    real = F.measure_step(F.prepared_model(SMALL, setting, TARGETS, fake=False), SMALL, setting,
                          text_len=TEXT_LEN, block=1)
    assert real["peak"] == estimate["peak"] and real["after_forward"] == estimate["after_forward"]
    assert estimate["peak"]["optimizer"] == 2 * 4 * estimate["trainable_params"] + 4 * _n_params(setting)
    assert estimate["peak"]["total"] >= after["total"]


def _n_params(setting) -> int:
    """AdamW's ``step`` counters: one float32 scalar per trainable tensor."""
    model = F.build_model(SMALL, setting, TARGETS, device="meta")
    return sum(1 for p in model.parameters() if p.requires_grad)


def test_checkpointing_keeps_fewer_activations_and_the_tracker_sees_it():
    no, yes = (F.measure_step(F.prepared_model(SMALL, F.Setting("bf16", 64, 4, c, "triu_deltaR"), TARGETS), SMALL,
                              F.Setting("bf16", 64, 4, c, "triu_deltaR"), text_len=TEXT_LEN, block=1)
               for c in (False, True))
    assert yes["after_forward"]["activations"] < no["after_forward"]["activations"]


def test_bench_rows_on_a_small_config_under_fake_tensors():
    rows, measured = [], {}
    for base in F.BASES:
        for method in F.METHODS:
            setting = F.Setting(base, 512, 4, True, method)
            measured[(base, method)] = m = F.measure_step(F.prepared_model(SMALL, setting, TARGETS), SMALL, setting,
                                                          text_len=TEXT_LEN)
            rows += F.rows_of(setting, m, swaps=(0, 1, 2, 3))
    fields = {"base", "resolution", "rank", "checkpointing", "blocks_to_swap", "method", "peak_gib", "params_gib",
              "activations_gib", "optimizer_gib", "estimated_on"}
    assert len(rows) == 3 * 2 * 4 and all(fields <= set(r) and r["estimated_on"] == "cpu" for r in rows)
    for method in F.METHODS:
        params = [measured[(b, method)]["peak"]["params"] for b in ("nf4", "fp8", "bf16")]
        assert params[0] < params[1] < params[2]
        blocks = measured[("bf16", method)]["block_bytes"]
        assert len(blocks) == 3 and F.swap_saving(blocks, 1) == 0 and F.swap_saving(blocks, 3) == min(blocks)
    best = F.best_24gb([{**r, "rank": 64} for r in rows], budget=1.0)
    assert best["base"] == "bf16" and best["blocks_to_swap"] == 0 and best["method"] == "triu_deltaR"
    assert "--gradient_checkpointing" in F.flags_of(best)
    assert "estimated on CPU" in F.render({"machine": {"date": "d", "command": "c"}, "resident": F.RESIDENT,
                                           "rows": rows, "best_24gb": {**best, "flags": F.flags_of(best)},
                                           "vae_gib": 0.1, "notes": F.NOTES})


@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_block_fit_equals_the_whole_model_measured(checkpointing):
    """The bench measures 1-2 blocks and extrapolates to 19 + 38; on a small model the fit must equal a direct
    measurement of (2, 3) blocks."""
    setting = F.Setting("nf4", 64, 4, checkpointing, "triu_deltaR")
    config = F.with_blocks(SMALL, 2, 3)
    fitted = F.measure_settings(config, [setting], TARGETS)[0]
    direct = F.measure_settings(config, [setting], TARGETS, fitted=False)[0]
    assert fitted["peak"] == direct["peak"] and fitted["after_forward"] == direct["after_forward"]
    assert fitted["block_bytes"] == direct["block_bytes"] and fitted["trainable_params"] == direct["trainable_params"]


def test_swap_saving_counts_all_but_the_blocks_in_flight():
    sizes = [10, 10, 4, 4, 4]
    assert F.swap_saving(sizes, 0) == 0 and F.swap_saving(sizes, 2) == 0
    assert F.swap_saving(sizes, 3) == 4
    assert F.swap_saving(sizes, 5) == 4 + 4 + 4  # the two largest (10, 10) are the ones in flight


def test_quantized_stand_in_holds_the_quantized_bytes():
    from torch import nn

    model = nn.Sequential(nn.Linear(256, 128))
    model.requires_grad_(False)
    assert F.quantize_stand_in_(model, "nf4") == 1
    layer = model[0]
    n = 256 * 128
    assert layer.packed.nbytes == n // 2 and layer.scales.numel() == n // 64
    x = torch.randn(2, 256, requires_grad=True)
    layer(x).sum().backward()  # the bf16 weight is dequantized in forward and again in backward
    assert x.grad.shape == x.shape


def test_readme_flux_memory_table_is_the_committed_report():
    from bench import readme_table

    assert readme_table.FLUX_PAGE == REPO / "docs/memory.md"
    readme = readme_table.FLUX_PAGE.read_text()
    assert readme.count(readme_table.FLUX_START) == 1 and readme.count(readme_table.FLUX_END) == 1
    block = readme.split(readme_table.FLUX_START, 1)[1].split(readme_table.FLUX_END, 1)[0]
    assert readme_table.FLUX_START + block + readme_table.FLUX_END == readme_table.render_flux_memory(), \
        "docs/memory.md FLUX memory table differs from bench/reports/flux_memory.json: run python -m bench.readme_table --write"
    assert "estimated on CPU" in block


def test_gpu_flux_memory_child_runs_the_estimate_rows_on_the_cpu(tmp_path):
    """bench/gpu_flux.py's part 4 child, on the tiny CPU config: it runs each wanted row's two training steps (no
    GPU: no number, a logic check) and leaves block-swap rows and other bases alone."""
    import json

    from bench import gpu_flux

    rows = [{"base": "bf16", "resolution": 64, "rank": 4, "checkpointing": c, "blocks_to_swap": n,
             "method": "triu_deltaR", "peak_gib": 0.001} for c in (False, True) for n in (0, 8)]
    estimate = tmp_path / "flux_memory.json"
    estimate.write_text(json.dumps({"rows": rows}))
    out = gpu_flux.run_memory("memory:bf16:4:triu_deltaR", "cpu", True, estimate)
    assert [r["key"] for r in out["rows"]] == [["bf16", 64, 4, False, 0, "triu_deltaR"], ["bf16", 64, 4, True, 0, "triu_deltaR"]]
    assert all(r["measured_peak_gib"] is None and "measured_error" not in r for r in out["rows"])
