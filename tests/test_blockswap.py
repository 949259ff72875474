"""Block swap (``--blocks_to_swap``): the same adapter as without it, the weights really leave the device, bad N refused.

On the CPU the host and the device are the same kind of memory, but the code path is the one CUDA takes: the
swapped weights' device storage is freed (size 0) between uses and refilled from the host copy, counted in
``BlockSwap.loads`` / ``frees``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import REPO, error_lines
from qrlora.training import trainer
from qrlora.training.blockswap import BlockSwap, frozen_base_parameters
from qrlora.files.checkpoint import load_adapter
from qrlora.core.inject import inject_adapters
from qrlora.core.methods import AdapterConfig


class Block(nn.Module):
    """A residual MLP block with two adaptable Linears (stand-in for a transformer block)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self, depth=4, width=8, checkpointing=False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.checkpointing = checkpointing

    def forward(self, x):
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return x


def adapted_stack(checkpointing=False):
    model = Stack(checkpointing=checkpointing)
    inject_adapters(model, AdapterConfig(method="triu_deltaR", rank=2, use_zero_init=False, delta_scale=0.1), ["fc1", "fc2"])
    return model


def grads_of(model, steps=2, swap=0, checkpointing=False):
    """Adapter gradients of ``steps`` forward/backward passes; with ``swap``, the BlockSwap that ran them."""
    torch.manual_seed(1)
    x = torch.randn(3, 8)
    swapper = BlockSwap.attach(list(model.blocks), swap, "cpu") if swap else None
    grads = []
    for _ in range(steps):
        model.zero_grad()
        if swapper:  # between steps every swapped weight is off the device
            assert all(p.untyped_storage().nbytes() == 0 for e in swapper.swapped.values() for p in e.params)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    return grads, swapper


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("swap", [1, 3, 4])
def test_swapped_gradients_equal_and_moves_counted(swap, checkpointing):
    plain, _ = grads_of(adapted_stack(checkpointing))
    swapped, swapper = grads_of(adapted_stack(checkpointing), swap=swap)
    for a, b in zip(plain, swapped):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Each step: every swapped block is loaded for its forward and again for its backward, except the last
    # block, which stays on the device from its forward into its backward; every load is freed again.
    assert swapper.loads == 2 * (2 * swap - 1)
    assert swapper.frees == swapper.loads


def test_only_frozen_base_weights_move():
    model = adapted_stack()
    swapper = BlockSwap.attach(list(model.blocks), 2, "cpu")
    moved = {id(p) for e in swapper.swapped.values() for p in e.params}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and not moved & {id(p) for p in trainable}
    assert len(moved) == sum(len(frozen_base_parameters(b)) for b in model.blocks[2:]) == 2 * 4  # 2 Linears x (W, b)
    with torch.no_grad():  # inference: each block in, out; nothing stays
        model(torch.randn(1, 8))
    assert swapper.loads == swapper.frees == 2


def run(model, out, *extra):
    from qrlora.cli.train import main

    return main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(REPO / "assets/cnt/cat"),
                 "--instance_prompt", "a photo of a <c> cat", "--resolution", "64", "--max_train_steps", "2",
                 "--max_sequence_length", "16", "--output_dir", str(out), "--lora_init_method", "triu_deltaR", *extra])


@pytest.mark.parametrize("fixture", ["tiny_flux", "tiny_sd3"])
def test_trained_adapter_equals_unswapped(fixture, request, tmp_path, monkeypatch):
    model = request.getfixturevalue(fixture)
    plain = load_adapter(run(model, tmp_path / "plain"))
    seen = []
    original = trainer.attach_block_swap
    monkeypatch.setattr(trainer, "attach_block_swap", lambda *a: seen.append(original(*a)) or seen[-1])
    swapped = load_adapter(run(model, tmp_path / "swapped", "--blocks_to_swap", "2", "--gradient_checkpointing"))
    assert seen[0].loads >= 2 * 3 and seen[0].frees == seen[0].loads  # 2 steps x (2 forward + 1 backward) loads
    for path, tensors in plain.layers.items():
        for name, value in tensors.items():
            torch.testing.assert_close(swapped.layers[path][name], value, rtol=0, atol=1e-6, msg=f"{path}.{name}")


@pytest.mark.parametrize("n, message", [("3", "--blocks_to_swap 3: the flux denoiser has only 2 transformer blocks"),
                                        ("-1", "--blocks_to_swap must be non-negative")])
def test_bad_block_count_is_one_line(tiny_flux, tmp_path, capsys, n, message):
    with pytest.raises(SystemExit) as exc:
        run(tiny_flux, tmp_path / "out", "--blocks_to_swap", n)
    assert exc.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_sdxl_refused(tiny_sdxl, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tiny_sdxl, tmp_path / "out", "--blocks_to_swap", "1")
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--blocks_to_swap" in lines[0] and "sdxl" in lines[0]


def test_the_cpu_runs_the_stream_path_of_cuda(monkeypatch):
    """Issue 28: the side-stream code (wait_stream, stream context, events, non-blocking copies) ran only on CUDA and
    never anywhere; on the CPU the same calls now go through torch.cpu's stand-ins. Every load records one event on
    the side stream after allocating on the main stream, and every use waits for it."""
    calls = []
    real_event, real_stream_ctx = torch.cpu.Event, torch.cpu.stream

    class CountingEvent(real_event):
        def record(self, stream=None):
            calls.append("record")
            return super().record(stream)

    def counting_stream(stream):
        calls.append("side")
        return real_stream_ctx(stream)

    monkeypatch.setattr(torch.cpu, "Event", CountingEvent)
    monkeypatch.setattr(torch.cpu, "stream", counting_stream)
    _, swapper = grads_of(adapted_stack(), swap=2)
    assert calls.count("record") == calls.count("side") == swapper.loads > 0
