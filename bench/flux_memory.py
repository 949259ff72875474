"""FLUX.1-dev training peak memory, estimated on the CPU: one real training step under torch's fake tensors.

The real ``FluxTransformer2DModel`` (the published FLUX.1-dev config, ~11.9 B parameters) is built inside
``torch._subclasses.FakeTensorMode``: every tensor has its true shape, dtype and storage size but no data, so no
FLOP is computed and no memory is allocated. On it runs one real training step of the trainer's own code:
``Backbone.training_loss`` of the FLUX backbone (packing, ids, guidance, flow target), the repository's adapter
layers (``qrlora.core.inject.attach_adapter``: the ``AdapterLinear`` / ``AdapterState`` modules the trainer trains,
triangular mask included) or PEFT LoRA through diffusers' ``add_adapter``, bf16 autocast with float32 trainable
parameters, backward, gradient clipping, AdamW (``foreach``, the CUDA default), ``apply_constraints_``,
``zero_grad``, measured on the second step (AdamW's state exists). ``StorageTracker``, a ``TorchDispatchMode``
that follows every storage's life with weak-reference finalizers as torch's ``MemTracker`` does (which itself
refuses a model with frozen parameters: it hooks every parameter's gradient), reports the peak with its split
into parameters (frozen base, adapter buffers and parameters), gradients, optimizer state and activations
(everything else alive at the peak: saved tensors and temporaries). ``tests/test_flux_memory.py`` checks it
against a real run of a small FLUX on the CPU.

What is modelled rather than run (see ``NOTES``, which the report repeats):

* fp8 / nf4 bases: torchao and bitsandbytes need CUDA and real data, so every frozen base Linear is replaced by
  a stand-in that stores the quantized weight's bytes (fp8: 1 byte per weight + one bf16 scale per output row;
  nf4: half a byte per weight + bitsandbytes' double-quantized absmax, 1 byte per 64 weights + 4 bytes per 256
  blocks) and dequantizes a bf16 copy of the weight for its matmul in forward and again in backward (a
  temporary, never saved), as both libraries do for a frozen weight;
* block swap N: the last N blocks of ``transformer_blocks + single_transformer_blocks`` keep their frozen
  weights on the CPU; two blocks are in flight on the GPU (the one computing and the next one being copied), the
  adapters' parameters, gradients and optimizer state stay on the GPU, and activations are unchanged. The GPU
  estimate is the measured peak minus the swapped blocks' frozen bytes plus the two largest of them;
* what is resident: the transformer and its adapters only (prompt embeddings and latents cached, so neither
  the text encoders nor the VAE are loaded, as with a ``--cache_dir`` hit). The FLUX VAE the trainer keeps on
  the GPU with ``--cache_latents`` alone adds ``vae_gib`` (reported once);
* the CUDA caching allocator's fragmentation and the CUDA context (~0.3-0.5 GiB) are not in the estimate.

    python -m bench.flux_memory --output bench/reports/flux_memory.json     # every row (a few minutes, one core)
    python -m bench.flux_memory --quick                                      # 512 px, rank 64 only
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import _common as C

GIB = 2**30
BASES = ("bf16", "fp8", "nf4")
RESOLUTIONS = (512, 1024)
RANKS = (16, 64)
METHODS = ("triu_deltaR", "peft_lora")
BLOCKS_TO_SWAP = (0, 8, 16, 24, 32)
IN_FLIGHT_BLOCKS = 2  # the block computing and the next one being copied to the GPU
TEXT_LEN = 512  # FLUX.1-dev's T5 sequence length (the trainer's default --max_sequence_length)
BUDGET_24GB_GIB = 22.0  # what a 24 GB card leaves for tensors after the CUDA context and fragmentation
# Quantized bytes per weight of a frozen base Linear (see the module docstring).
QUANT_BYTES_PER_WEIGHT = {"fp8": 1.0, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
RESIDENT = "transformer + adapters (prompt embeddings and latents cached: no text encoders, no VAE)"
NOTES = [
    "every number is estimated on CPU: the second real training step under torch FakeTensorMode, every storage "
    "followed by a dispatch-mode tracker (rounded to 512 B blocks); no CUDA context, no allocator fragmentation",
    "the 19 double + 38 single blocks are extrapolated exactly-linearly from steps measured at (1, 1), (2, 1) and "
    "(1, 2) blocks of the real width (every count is c + D a + S b); full_model_check compares the fit with the "
    "whole model measured directly",
    "fp8 / nf4 bases cannot run under fake tensors (torchao / bitsandbytes need CUDA and data): each frozen base "
    "Linear is a stand-in holding the quantized bytes (fp8 1 B/weight + a bf16 scale per row; nf4 0.5 B/weight + "
    "double-quantized absmax) that dequantizes a bf16 weight copy per matmul (a temporary, not saved)",
    f"block swap N: the last N of the 57 blocks (19 double, then 38 single) keep their frozen weights on the CPU, "
    f"{IN_FLIGHT_BLOCKS} are in flight on the GPU; adapters, gradients, optimizer state and activations stay on "
    "the GPU; GPU estimate = measured peak - swapped frozen bytes + the 2 largest swapped blocks",
    "resident: the transformer and its adapters; the trainer with --cache_latents alone also keeps the VAE on the "
    "GPU (vae_gib); the text encoders are freed after encoding either way",
    "SDPA under fake CPU tensors takes the flash-attention path (saves out + logsumexp, no L x L matrix), as "
    "flash / memory-efficient attention does on a GPU",
]


# --------------------------------------------------------------------------------------------------------
# Quantized-base stand-in
# --------------------------------------------------------------------------------------------------------
def _dequantized(layer) -> "torch.Tensor":
    """The bf16 (out, in) weight the quantized kernels materialise for one matmul (values irrelevant here)."""
    import torch

    return layer.packed.new_zeros((layer.out_features, layer.in_features), dtype=torch.bfloat16)


def _quantized_linear_function():
    import torch

    class QuantizedMatmul(torch.autograd.Function):
        """``x @ dequant(W).T + b`` saving only the quantized weight (bitsandbytes' MatMul4Bit for a frozen B)."""

        @staticmethod
        def forward(ctx, x, layer):
            ctx.layer = layer
            return torch.nn.functional.linear(x.to(torch.bfloat16), _dequantized(layer), layer.bias)

        @staticmethod
        def backward(ctx, grad):
            return grad.to(torch.bfloat16) @ _dequantized(ctx.layer), None

    return QuantizedMatmul


class _QuantizedLinearFactory:
    """Builds ``QuantizedLinearStandIn`` modules (the class needs torch, imported lazily)."""

    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            import torch
            from torch import nn

            fn = _quantized_linear_function()

            class QuantizedLinearStandIn(nn.Module):
                """A frozen Linear stored in ``precision``: the quantized bytes as buffers, a bf16 bias."""

                def __init__(self, linear: nn.Linear, precision: str):
                    super().__init__()
                    self.in_features, self.out_features = linear.in_features, linear.out_features
                    n = linear.in_features * linear.out_features
                    device = linear.weight.device
                    if precision == "fp8":
                        self.register_buffer("packed", torch.empty(n, dtype=torch.float8_e4m3fn, device=device))
                        self.register_buffer("scales", torch.empty(linear.out_features, dtype=torch.bfloat16, device=device))
                    else:  # nf4: two 4-bit codes per byte, uint8 absmax per 64, float32 per 256 absmax blocks
                        self.register_buffer("packed", torch.empty((n + 1) // 2, dtype=torch.uint8, device=device))
                        self.register_buffer("scales", torch.empty(-(-n // 64), dtype=torch.uint8, device=device))
                        self.register_buffer("scales2", torch.empty(-(-n // (64 * 256)), dtype=torch.float32, device=device))
                    self.bias = None if linear.bias is None else nn.Parameter(
                        linear.bias.detach().to(torch.bfloat16), requires_grad=False)

                @property
                def weight(self):  # what code reading ``.weight`` of a quantized Linear gets (its storage)
                    return self.packed

                def forward(self, x):
                    return fn.apply(x, self)

            cls.cls = QuantizedLinearStandIn
        return cls.cls


def quantize_stand_in_(model, precision: str) -> int:
    """Replace every frozen ``nn.Linear`` of ``model`` (not the adapters' own) with the ``precision`` stand-in,
    as ``qrlora.core.quantize.quantize_base_`` does with the real libraries. Returns the number replaced."""
    from torch import nn

    stand_in = _QuantizedLinearFactory.get()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not any(p.requires_grad for p in child.parameters()):
                setattr(parent, name, stand_in(child, precision))
                count += 1
    return count


# --------------------------------------------------------------------------------------------------------
# One tracked training step
# --------------------------------------------------------------------------------------------------------
@dataclass
class Setting:
    base: str  # bf16 | fp8 | nf4
    resolution: int
    rank: int
    checkpointing: bool
    method: str  # a qrlora method name or "peft_lora"


def build_model(config: dict, setting: Setting, targets, device: str = "meta", dtype=None):
    """The FLUX transformer of ``config`` with ``setting``'s adapters (and quantized base) on ``device``: the
    state the trainer trains in (frozen base in ``dtype``, default bf16, adapters float32, trainable parameters
    float32). Built on ``meta`` for ``fake_tensors_``: under FakeTensorMode itself ``module.to()`` cannot swap
    parameters (the mode holds weak references to them)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from qrlora.core.inject import attach_adapter, find_target_modules
    from qrlora.core.methods import AdapterConfig, get_method

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.bfloat16)  # built in its dtype: no float32 copy of the model first
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config).requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    if setting.method == "peft_lora":
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=setting.rank, lora_alpha=setting.rank, init_lora_weights="gaussian",
                                     target_modules=list(targets)))
        for p in model.parameters():  # diffusers' cast_training_params: trainable parameters in float32
            if p.requires_grad:
                p.data = p.data.float()
    else:
        # The adapter tensors' values do not change memory: zeros of the method's own shapes, through the same
        # attach path the trainer's resume uses (AdapterLinear + AdapterState, triangular mask included).
        adapter = AdapterConfig(method=setting.method, rank=setting.rank)
        method = get_method(setting.method)
        layers = {}
        for path in find_target_modules(model, targets):
            out_f, in_f = model.get_submodule(path).weight.shape
            layers[path] = {n: torch.zeros(s, device=device) for n, s in method.shapes(out_f, in_f, adapter).items()}
        attach_adapter(model, adapter, layers, trainable=True)
    if setting.base in QUANT_BYTES_PER_WEIGHT:
        quantize_stand_in_(model, setting.base)
    model.train()
    return model


def fake_tensors_(model, mode, device: str = "cpu"):
    """Give every parameter and buffer of the meta-device ``model`` a fake ``device`` tensor of ``mode`` (same
    shape, dtype, requires_grad; a storage of its own): the model ``mode`` then runs without data."""
    from torch import nn

    convert = mode.fake_tensor_converter.from_meta_and_device
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(convert(mode, p, device), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = convert(mode, b, device)
    return model


def frozen_block_bytes(model) -> list[int]:
    """Frozen bytes (parameters and buffers not trained, adapters' frozen bases excluded) of each block, in the
    order ``transformer_blocks`` then ``single_transformer_blocks``: what block swap can keep on the CPU."""
    from qrlora.core.layers import AdapterState

    sizes = []
    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        adapter_ids = {id(t) for m in block.modules() if isinstance(m, AdapterState)
                       for t in list(m.parameters()) + list(m.buffers())}
        tensors = {id(t): t for t in list(block.parameters()) + list(block.buffers())
                   if not t.requires_grad and id(t) not in adapter_ids}
        sizes.append(sum(t.untyped_storage().nbytes() for t in tensors.values()))
    return sizes


def swap_saving(block_bytes: list[int], n: int) -> int:
    """GPU bytes block swap ``n`` saves: the last ``n`` blocks' frozen bytes minus the (largest) blocks in flight."""
    if n <= 0:
        return 0
    swapped = sorted(block_bytes[-n:], reverse=True)
    return sum(swapped) - sum(swapped[:IN_FLIGHT_BLOCKS])


def make_inputs(config: dict, resolution: int, text_len: int, device: str = "cpu"):
    """Cached latents (B=1, C, H/8, W/8) and prompt embeddings, bf16, as the trainer feeds them."""
    import torch

    side = resolution // 8
    gen = torch.Generator(device=device).manual_seed(0)
    kw = dict(generator=gen, dtype=torch.bfloat16, device=device)
    latents = torch.randn(1, config["in_channels"] // 4, side, side, **kw)
    cond = {"prompt_embeds": torch.randn(1, text_len, config["joint_attention_dim"], **kw),
            "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"], **kw),
            "text_ids": torch.zeros(text_len, 3, device=device)}
    return latents, cond


def flux_schedule(mode=None):
    """FLUX.1-dev's training noise table (FlowMatchEulerDiscrete, shift 3), made from real tensors (the scheduler
    reads values while it builds them) and, given a fake ``mode``, converted to its fake tensors."""
    import dataclasses

    from diffusers import FlowMatchEulerDiscreteScheduler

    from qrlora.core.objective import NoiseSchedule

    schedule = NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0))
    if mode is None:
        return schedule
    return dataclasses.replace(schedule, timesteps=mode.from_tensor(schedule.timesteps),
                               sigmas=mode.from_tensor(schedule.sigmas))


def training_step(model, optimizer, latents, cond, schedule, tracker=None) -> None:
    """The trainer's update on one micro-batch: FLUX ``training_loss`` under bf16 autocast, backward, clipping,
    AdamW, the triangular constraint, ``zero_grad``. A ``StorageTracker`` gets the mark ``after_forward`` and
    counts what the optimizer step creates as ``optimizer``."""
    import torch

    from qrlora.backbones import BACKBONES
    from qrlora.core.layers import apply_constraints_
    from qrlora.core.objective import Objective

    flux = BACKBONES["flux"]
    objective = Objective(prediction_type="flow", guidance_scale=3.5)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    with torch.autocast(latents.device.type, dtype=torch.bfloat16):  # accelerate's bf16 mixed precision
        draws = torch.Generator(device=latents.device).manual_seed(1)
        loss = flux.training_loss(model, latents, cond, schedule, objective, draws).mean()
    if tracker is not None:
        tracker.mark("after_forward")
    loss.backward()
    del loss
    with tracker.phase("optimizer") if tracker is not None else contextlib.nullcontext():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    apply_constraints_(model)
    optimizer.zero_grad(set_to_none=True)


def warm_optimizer_(optimizer) -> None:
    """Create AdamW's state (two float32 moments per trainable parameter) with one zero-gradient step, as the
    first training step leaves it: from the second step on the state is resident through forward and backward."""
    import torch

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class StorageTracker:
    """Live tensor storage bytes by kind through a training step, and the peak with its split.

    A ``TorchDispatchMode`` (under ``FakeTensorMode`` or on real tensors alike) sees every op's outputs; each new
    storage is counted until a weak-reference finalizer reports it freed, the way torch's ``MemTracker`` works.
    (``MemTracker`` itself cannot follow this step: it puts a gradient hook on every parameter, and a frozen
    base's parameters refuse hooks.) Kinds: ``params`` (parameters and buffers present at the start),
    ``gradients`` (a trainable parameter's ``.grad``, reclassified when it is accumulated), ``optimizer``
    (storages created inside ``phase("optimizer")``: AdamW's state, and its step temporaries while they live),
    ``activations`` (everything else: saved tensors, temporaries, inputs, the loss). Sizes are rounded up to
    ``block`` bytes, the CUDA caching allocator's smallest block (512).
    """

    KINDS = ("params", "gradients", "optimizer", "activations")

    def __init__(self, model, params, block: int = 512):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode

        self._weakref = weakref
        self.block = block
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, kind, weakref]
        self.sums = dict.fromkeys(self.KINDS, 0)
        self.peak = dict(self.sums, total=0)
        self.marks: dict[str, dict] = {}
        self._kind = "activations"
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in _tensors(out):
                    tracker._add(t, tracker._kind)
                return out

        self._mode = _Mode()
        for t in list(model.parameters()) + list(model.buffers()):
            self._add(t, "params")
        self._hooks = [p.register_post_accumulate_grad_hook(lambda p: self._reclassify(p.grad, "gradients"))
                       for p in params]

    def close(self) -> None:
        """Remove the gradient hooks (the model may be measured again by another tracker)."""
        for h in self._hooks:
            h.remove()

    def _bytes(self, st) -> int:
        return -(-st.nbytes() // self.block) * self.block if st.nbytes() else 0

    def _add(self, t, kind: str) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        n = self._bytes(st)
        self.live[key] = [n, kind, self._weakref.ref(st, lambda _, key=key: self._free(key))]
        self.sums[kind] += n
        self._update_peak()

    def _free(self, key: int) -> None:
        n, kind, _ = self.live.pop(key)
        self.sums[kind] -= n

    def _reclassify(self, t, kind: str) -> None:
        entry = self.live.get(id(t.untyped_storage())) if t is not None else None
        if entry is not None and entry[1] != kind:
            self.sums[entry[1]] -= entry[0]
            self.sums[kind] += entry[0]
            entry[1] = kind

    def _update_peak(self) -> None:
        total = sum(self.sums.values())
        if total > self.peak["total"]:
            self.peak = dict(self.sums, total=total)

    def current(self) -> dict[str, int]:
        return dict(self.sums, total=sum(self.sums.values()))

    def mark(self, name: str) -> None:
        """Remember the live bytes by kind now, as ``marks[name]``."""
        self.marks[name] = self.current()

    @contextlib.contextmanager
    def phase(self, kind: str):
        """Count storages created inside as ``kind``."""
        previous, self._kind = self._kind, kind
        try:
            yield
        finally:
            self._kind = previous

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _tensors(out):
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def prepared_model(config: dict, setting: Setting, targets, fake: bool = True, dtype=None):
    """``(model, mode, schedule)`` ready for ``measure_step``: built on ``meta`` and given fake tensors of a new
    ``FakeTensorMode`` (``fake=True``), or built for real on the CPU (``mode`` a null context)."""
    from torch._subclasses import FakeTensorMode

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    model = build_model(config, setting, targets, device="meta" if fake else "cpu", dtype=dtype)
    if fake:
        fake_tensors_(model, mode)
    return model, mode, flux_schedule(mode if fake else None)


def measure_step(prepared, config: dict, setting: Setting, text_len: int = TEXT_LEN, block: int = 512) -> dict:
    """Peak memory of a training step in ``setting`` on a ``prepared_model`` (the second step: AdamW's state
    exists): bytes by kind at the peak and after the forward, each block's frozen bytes. The model is reused
    across resolutions and checkpointing (``setting`` switches checkpointing on or off)."""
    import torch

    model, mode, schedule = prepared
    if setting.checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    with mode:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # foreach: the CUDA default
        tracker = StorageTracker(model, params, block=block)
        with tracker:
            with tracker.phase("optimizer"):
                warm_optimizer_(optimizer)
            latents, cond = make_inputs(config, setting.resolution, text_len)
            training_step(model, optimizer, latents, cond, schedule, tracker)
        tracker.close()
        blocks = frozen_block_bytes(model)
        trainable = sum(p.numel() for p in params)
    return {"peak": tracker.peak, "after_forward": tracker.marks["after_forward"], "block_bytes": blocks,
            "trainable_params": trainable}


# The FLUX transformer is the same double-stream block 19 times and the same single-stream block 38 times, so
# every count of a training step is ``c + D a + S b`` in the block counts (D, S): measured at (1, 1), (2, 1) and
# (1, 2) blocks of the real width, it is known at (19, 38) for 1/15 of the fake-tensor dispatch cost. The report
# checks the fit against a direct measurement of the whole model (``full_model_check``), and so does a test.
FIT_POINTS = ((1, 1), (2, 1), (1, 2))


def with_blocks(config: dict, double: int, single: int) -> dict:
    return {**config, "num_layers": double, "num_single_layers": single}


def extrapolate(points: dict[tuple[int, int], dict], double: int, single: int) -> dict:
    """``measure_step`` results at ``FIT_POINTS`` -> the result at (``double``, ``single``) blocks (exactly
    linear in the block counts; see above)."""
    p11, p21, p12 = (points[k] for k in FIT_POINTS)

    def fit(v11, v21, v12):
        a, b = v21 - v11, v12 - v11
        return v11 + (double - 1) * a + (single - 1) * b

    out = {key: {k: fit(p11[key][k], p21[key][k], p12[key][k]) for k in p11[key]} for key in ("peak", "after_forward")}
    out["trainable_params"] = fit(p11["trainable_params"], p21["trainable_params"], p12["trainable_params"])
    out["block_bytes"] = [p11["block_bytes"][0]] * double + [p11["block_bytes"][1]] * single
    return out


def measure_settings(config: dict, settings: list[Setting], targets, fitted: bool = True) -> list[dict]:
    """``measure_step`` of each of ``settings`` (which share base, rank and method), the model built once:
    fitted from ``FIT_POINTS`` (default) or measured directly on the whole ``config``."""
    first = settings[0]
    if not fitted:
        prepared = prepared_model(config, first, targets)
        return [measure_step(prepared, config, s) for s in settings]
    per_point = {}
    for d, sgl in FIT_POINTS:
        small = with_blocks(config, d, sgl)
        prepared = prepared_model(small, first, targets)
        per_point[(d, sgl)] = [measure_step(prepared, small, s) for s in settings]
    return [extrapolate({k: v[i] for k, v in per_point.items()}, config["num_layers"], config["num_single_layers"])
            for i in range(len(settings))]


def vae_bytes() -> int:
    """bf16 bytes of the FLUX.1-dev VAE (AutoencoderKL, 16 latent channels), counted on the meta device."""
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**C.FLUX_VAE_CONFIG)
    return sum(p.numel() for p in vae.parameters()) * 2


# --------------------------------------------------------------------------------------------------------
# Rows, the 24 GB choice, output
# --------------------------------------------------------------------------------------------------------
def rows_of(setting: Setting, measured: dict, swaps=BLOCKS_TO_SWAP) -> list[dict]:
    """Report rows of one measured step: one per block-swap count (the swap is modelled, see the docstring)."""
    peak = measured["peak"]
    out = []
    for n in swaps:
        saved = swap_saving(measured["block_bytes"], n)
        out.append({
            "base": setting.base, "resolution": setting.resolution, "rank": setting.rank,
            "checkpointing": setting.checkpointing, "blocks_to_swap": n, "method": setting.method,
            "peak_gib": round((peak["total"] - saved) / GIB, 3),
            "params_gib": round((peak["params"] - saved) / GIB, 3),
            "activations_gib": round(peak["activations"] / GIB, 3),
            "gradients_gib": round(peak["gradients"] / GIB, 3),
            "optimizer_gib": round(peak["optimizer"] / GIB, 3),
            "activations_after_forward_gib": round(measured["after_forward"]["activations"] / GIB, 3),
            "trainable_params": measured["trainable_params"],
            "resident": RESIDENT,
            "estimated_on": "cpu",
        })
    return out


BASE_PREFERENCE = {"bf16": 0, "fp8": 1, "nf4": 2}  # unquantized first: the base the adapter will be used with


def best_24gb(rows: list[dict], budget: float = BUDGET_24GB_GIB) -> dict | None:
    """At 512 px, rank 64, triu_deltaR: the fitting row with the least-lossy base, then the fewest swapped blocks
    (swapping costs transfer time), then without checkpointing (recompute costs a forward)."""
    fits = [r for r in rows if r["resolution"] == 512 and r["rank"] == 64 and r["method"] == "triu_deltaR"
            and r["peak_gib"] <= budget]
    if not fits:
        return None
    return min(fits, key=lambda r: (BASE_PREFERENCE[r["base"]], r["blocks_to_swap"], r["checkpointing"]))


def flags_of(row: dict) -> str:
    """The trainer flags that give ``row``."""
    flags = [f"--base_precision {row['base']}"]
    if row["checkpointing"]:
        flags.append("--gradient_checkpointing")
    flags += ["--cache_latents", "--cache_dir DIR"]
    if row["blocks_to_swap"]:
        flags.append(f"--blocks_to_swap {row['blocks_to_swap']}")
    return " ".join(flags)


def render(payload: dict) -> str:
    lines = [f"# FLUX.1-dev training peak memory (estimated on CPU, {payload['machine']['date']})", "",
             f"Batch 1, {TEXT_LEN} text tokens, {payload['resident']}. Command: `{payload['machine']['command']}`.", ""]
    headers = ["base", "px", "rank", "ckpt", "swap", "method", "peak GiB", "params", "activations", "grads", "optimizer"]
    table = [[r["base"], r["resolution"], r["rank"], r["checkpointing"], r["blocks_to_swap"], r["method"],
              r["peak_gib"], r["params_gib"], r["activations_gib"], r["gradients_gib"], r["optimizer_gib"]]
             for r in payload["rows"]]
    lines += [C.markdown_table(headers, table), ""]
    best = payload.get("best_24gb")
    lines.append(f"24 GB (<= {BUDGET_24GB_GIB:g} GiB): " + (f"{best['peak_gib']:.2f} GiB with `{best['flags']}`" if best
                                                          else "no combination fits"))
    lines += ["", f"VAE (bf16), resident only with --cache_latents without --cache_dir: {payload['vae_gib']:.3f} GiB", ""]
    lines += [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/flux_memory.json); "
                                                             "the markdown goes beside it (.md)")
    p.add_argument("--quick", action="store_true", help="512 px, rank 64 only")
    p.add_argument("--full-model-check", action="store_true",
                   help="also measure the whole model directly at 512 px, rank 64, bf16, checkpointing (both methods; "
                        "about a minute of one core) and record it beside the per-block fit")
    args = p.parse_args(argv)
    resolutions, ranks = ((512,), (64,)) if args.quick else (RESOLUTIONS, RANKS)
    info = C.machine_info()
    rows, seconds = [], {}
    for base, rank, method in itertools.product(BASES, ranks, METHODS):
        settings = [Setting(base, res, rank, ckpt, method) for res in resolutions for ckpt in (False, True)]
        start = time.perf_counter()
        for setting, measured in zip(settings, measure_settings(C.FLUX_DEV_CONFIG, settings, C.DEFAULT_TARGETS)):
            rows += rows_of(setting, measured)
        key = f"{base}/r{rank}/{method}"
        seconds[key] = round(time.perf_counter() - start, 1)
        print(f"[flux_memory] {key}: {seconds[key]} s", file=sys.stderr, flush=True)
    # The fit against the whole model measured directly, at the 24 GB setting (both methods).
    check = []
    for method in METHODS if args.full_model_check else ():
        setting = Setting("bf16", 512, 64, True, method)
        direct = rows_of(setting, measure_settings(C.FLUX_DEV_CONFIG, [setting], C.DEFAULT_TARGETS, fitted=False)[0],
                         swaps=(0,))[0]
        fitted = next(r for r in rows if all(r[k] == direct[k] for k in
                                             ("base", "resolution", "rank", "checkpointing", "blocks_to_swap", "method")))
        check.append({"setting": {k: direct[k] for k in ("base", "resolution", "rank", "checkpointing", "method")},
                      **{f"{k}_direct": direct[k] for k in ("peak_gib", "params_gib", "activations_gib", "optimizer_gib")},
                      **{f"{k}_fitted": fitted[k] for k in ("peak_gib", "params_gib", "activations_gib", "optimizer_gib")}})
        print(f"[flux_memory] whole-model check {method}: direct {direct['peak_gib']} GiB, fitted {fitted['peak_gib']} GiB",
              file=sys.stderr, flush=True)
    best = best_24gb(rows)
    if best:
        best = {**best, "flags": flags_of(best)}
    payload = {
        "benchmark": "flux_memory",
        "estimated_on": "cpu",
        "model": {"class": "FluxTransformer2DModel", "config": C.FLUX_DEV_CONFIG, "targets": list(C.DEFAULT_TARGETS)},
        "batch_size": 1, "text_len": TEXT_LEN, "resident": RESIDENT, "in_flight_blocks": IN_FLIGHT_BLOCKS,
        "budget_24gb_gib": BUDGET_24GB_GIB,
        "vae_gib": round(vae_bytes() / GIB, 3),
        "notes": NOTES,
        "machine": info,
        "git_revision": C.git_revision(),
        "method_of_measurement": "per-block fit at (1, 1), (2, 1), (1, 2) blocks of the real width, extrapolated "
                                 "to 19 double + 38 single blocks; full_model_check: the whole model measured directly",
        "full_model_check": check,
        "seconds": seconds,
        "best_24gb": best,
        "rows": rows,
    }
    output = args.output or C.default_output("flux_memory")
    C.write_json(output, payload)
    text = render(payload)
    output.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nJSON: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
