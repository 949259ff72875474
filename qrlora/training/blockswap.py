"""Block swap (``--blocks_to_swap N``): the frozen weights of the last N transformer blocks live in host memory and
are copied onto the training device just before each block's forward and backward, one block ahead.

The idea is kohya sd-scripts' ``--blocks_to_swap``; the mechanism is different because the swapped weights here
are frozen: the host copy is made once and never written back, so every "move" is one host -> device copy, and
"moving out" is freeing the device storage (``untyped_storage().resize_(0)``, as FSDP frees unsharded
parameters). Freeing the storage rather than rebinding ``param.data`` matters: the tensors autograd saved for
backward (``weight.t()`` views of the same storage) see the weights again once the storage is refilled, so
backward needs no special saved-tensor handling, with or without gradient checkpointing.

Only frozen parameters outside adapter state (``qrlora.core.layers.AdapterState``) move: the adapters' own tensors
and the optimizer's state stay on the device. Order of events for swapped block ``j`` of ``L`` blocks:

- forward pre-hook: wait for ``j`` (prefetched while ``j - 1`` ran, or load it now), prefetch ``j + 1``;
- forward hook: free ``j`` (the last block stays when backward follows at once);
- gradient of ``j``'s outputs (backward starts on ``j``): wait for ``j``, prefetch ``j - 1``;
- gradients of all of ``j``'s inputs that need one (``j``'s backward is done): free ``j``;
- end of backward: free whatever is still resident (blocks whose inputs need no gradient).

On CUDA the host copies are pinned and prefetches run on a side stream; on any other device the same code runs
with synchronous copies (the storage really is freed and refilled, so the tests on the CPU exercise the path).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError


@dataclass
class _Swapped:
    """One swapped block: its frozen parameters, their host copies, and whether the device copy is filled."""

    block: nn.Module
    params: list[nn.Parameter]
    host: list[torch.Tensor]
    resident: bool = True
    ready: object = None  # a CUDA event while a prefetch is in flight


def frozen_base_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``block`` that swap: frozen and not an adapter's (adapter state stays on the device)."""
    from ..core.layers import AdapterState

    adapter_params = {id(p) for m in block.modules() if isinstance(m, AdapterState) for p in m.parameters()}
    return [p for p in block.parameters() if not p.requires_grad and id(p) not in adapter_params]


def check_blocks_to_swap(n: int, available: int, backbone_name: str, quantized: bool = False) -> None:
    """Refuse a ``--blocks_to_swap`` that cannot work (``available``: the denoiser's block count), in one line.

    Quantized bases (``--base_precision fp8 / nf4``) keep their weights in library tensor types whose storage
    this module does not manage, so the two are not combined.
    """
    if n < 0:
        raise UserError(f"--blocks_to_swap must be non-negative, got {n}")
    if n and quantized:
        raise UserError("--blocks_to_swap cannot be combined with --base_precision fp8 / nf4 (quantized weights do not swap); "
                        "use --base_precision bf16 with block swap")
    if n and not available:
        raise UserError(f"--blocks_to_swap: block swap is not supported for {backbone_name} "
                        "(its denoiser has no list of uniform transformer blocks); use it with FLUX or SD3")
    if n > available:
        raise UserError(f"--blocks_to_swap {n}: the {backbone_name} denoiser has only {available} transformer blocks")


@dataclass
class BlockSwap:
    """Swaps the frozen weights of the last ``n`` of ``blocks`` between host memory and ``device``.

    Build it with ``BlockSwap.attach`` before the model is moved to ``device`` (swapped weights never sit on the
    device all at once). ``loads`` and ``frees`` count host -> device copies and device frees (per block).
    """

    blocks: list[nn.Module]
    n: int
    device: torch.device
    swapped: dict[int, _Swapped] = field(default_factory=dict)
    loads: int = 0
    frees: int = 0
    _in_backward: bool = False
    _stream: object = None
    _streams: object = None  # torch.cuda, or torch.cpu's stand-ins
    _handles: list = field(default_factory=list)

    @classmethod
    def attach(cls, blocks: list[nn.Module], n: int, device: torch.device | str) -> "BlockSwap":
        """Put the last ``n`` blocks' frozen weights in host memory (pinned on CUDA) with freed device storage,
        and hook every block (a block before the first swapped one prefetches it)."""
        swap = cls(list(blocks), n, torch.device(device))
        cuda = swap.device.type == "cuda"
        # One code path on every device: on the CPU, torch.cpu's Stream / Event / stream() stand-ins run the same
        # calls in order (issue 28: the CUDA path had never run anywhere); only pinning needs a CUDA host.
        swap._streams = torch.cuda if cuda else torch.cpu
        swap._stream = torch.cuda.Stream(swap.device) if cuda else torch.cpu.Stream()
        for index in range(len(blocks) - n, len(blocks)):
            params = frozen_base_parameters(blocks[index])
            host = []
            for p in params:
                copy = p.data.to("cpu", copy=True)
                host.append(copy.pin_memory() if cuda else copy)
                # A fresh, resizable device tensor (loaded weights may be read-only memory maps), freed at once.
                p.data = torch.empty_like(p.data, device=swap.device)
                p.data.untyped_storage().resize_(0)
            swap.swapped[index] = _Swapped(blocks[index], params, host, resident=False)
        for index, block in enumerate(swap.blocks):
            swap._handles.append(block.register_forward_pre_hook(swap._make_pre_forward(index), with_kwargs=True))
            swap._handles.append(block.register_forward_hook(swap._make_post_forward(index)))
        return swap

    def detach(self) -> None:
        """Remove the hooks and put every swapped weight back on the device for good."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for index in self.swapped:
            self._wait(index)
        self.swapped.clear()

    # ---- moves ----------------------------------------------------------------------------------------------
    def _load(self, index: int) -> None:
        """Refill block ``index``'s device storage from its host copy (on the side stream on CUDA)."""
        entry = self.swapped.get(index)
        if entry is None or entry.resident:
            return
        self.loads += 1
        streams = self._streams
        # The storage is allocated here, on the main stream: memory allocated inside the side stream's context
        # would stay in that stream's pool of the caching allocator after the main stream frees it, so reserved
        # memory would grow past the estimate (issue 28).
        for p, host in zip(entry.params, entry.host):
            p.data.untyped_storage().resize_(host.untyped_storage().nbytes())
        # The side stream waits for work already queued on the main stream, so a freed block's memory, reused
        # here, is never overwritten while a kernel of the main stream still reads it.
        self._stream.wait_stream(streams.current_stream(self.device))
        with streams.stream(self._stream):
            for p, host in zip(entry.params, entry.host):
                p.data.copy_(host, non_blocking=True)  # asynchronous from pinned host memory on CUDA
            entry.ready = streams.Event()
            entry.ready.record(self._stream)
        entry.resident = True

    def _wait(self, index: int) -> None:
        """Make block ``index``'s weights usable by the current stream (loading them now if not prefetched)."""
        entry = self.swapped.get(index)
        if entry is None:
            return
        self._load(index)
        if entry.ready is not None:
            self._streams.current_stream(self.device).wait_event(entry.ready)
            entry.ready = None

    def _free(self, index: int) -> None:
        entry = self.swapped.get(index)
        if entry is None or not entry.resident:
            return
        self._wait(index)  # never free storage a copy is still being written into
        for p in entry.params:
            p.data.untyped_storage().resize_(0)
        entry.resident = False
        self.frees += 1

    def free_all(self) -> None:
        """Free every swapped block still on the device (end of backward, or after a forward without one)."""
        for index in self.swapped:
            self._free(index)
        self._in_backward = False

    # ---- hooks --------------------------------------------------------------------------------------------
    def _make_pre_forward(self, index: int):
        def hook(module, args, kwargs):
            self._wait(index)
            if self._in_backward:
                return None  # a recomputation inside backward (gradient checkpointing): no prefetch, no new hooks
            self._load(index + 1)
            inputs = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
            if index in self.swapped and inputs and torch.is_grad_enabled():
                # All of this block's input gradients computed: its backward no longer reads its weights.
                torch.autograd.graph.register_multi_grad_hook(inputs, lambda grads: self._free(index))
            return None
        return hook

    def _make_post_forward(self, index: int):
        def hook(module, args, output):
            if self._in_backward:
                return None
            outputs = [t for t in (output if isinstance(output, (tuple, list)) else (output,))
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            if outputs and torch.is_grad_enabled():
                for t in outputs:
                    t.register_hook(self._make_pre_backward(index))
                if index == len(self.blocks) - 1:
                    return None  # backward starts with this block: keep it
            self._free(index)
            return None
        return hook

    def _make_pre_backward(self, index: int):
        def hook(grad):
            if not self._in_backward:
                self._in_backward = True
                # Blocks whose inputs need no gradient never see their input hook fire: free them at the end.
                torch.autograd.Variable._execution_engine.queue_callback(self.free_all)
            self._wait(index)
            self._load(index - 1)
            return None
        return hook


def attach_block_swap(backbone, denoiser: nn.Module, n: int, device) -> BlockSwap | None:
    """``BlockSwap.attach`` on ``backbone``'s transformer blocks of ``denoiser``; None when ``n`` is 0.

    Call it before ``denoiser.to(device)``. The swapped weights are marked for DDP to leave alone (they are
    frozen and identical on every process, and DDP's start-up broadcast would read their freed storage).
    """
    if not n:
        return None
    blocks = backbone.transformer_blocks(denoiser)
    swap = BlockSwap.attach(blocks, n, device)
    moved = {id(p) for entry in swap.swapped.values() for p in entry.params}
    ignored = [name for name, p in denoiser.named_parameters() if id(p) in moved]
    denoiser._ddp_params_and_buffers_to_ignore = list(getattr(denoiser, "_ddp_params_and_buffers_to_ignore", [])) + ignored
    return swap
