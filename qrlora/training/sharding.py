"""Sharded training: an FSDP launch shards the frozen base across the processes; the adapter stays whole.

    accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes N -m qrlora.train ...

``accelerate launch`` with an FSDP config sets ``ACCELERATE_USE_FSDP`` (and ``FSDP_*``) in every process. The
trainer does not hand the model to accelerate's FSDP wrapping: accelerate's FSDP checkpoints hold the whole model
(here, the frozen base), and accelerate 1.15 does not run FSDP on the CPU at all (it leaves every process alone),
so nothing of it could be tested here. Instead ``fsdp_launch`` claims the launch before accelerate reads it: it
checks the FSDP settings and the flags, then tells accelerate to run the processes as plain data parallel (gloo on
the CPU); ``shard_base`` shards every frozen parameter of the denoiser with torch's FSDP2 ``fully_shard``, one unit
per block (``Backbone.shard_units``) plus the root for the rest, so each process holds ``1 / N`` of the base and
gathers one block at a time. The adapter's trainable parameters are ``ignored_params`` of every unit and its
frozen bases are buffers (FSDP2 shards parameters only): the whole adapter is an ordinary replicated tensor on
every process. ``prepare_sharded`` wraps the model in DDP, which averages only the adapter's gradients (every
sharded parameter and every buffer is on DDP's ignore list; accelerate's own ``prepare`` refuses DTensor models
under DDP on GPUs), so the optimizer, its state, the adapter file, ``save_state`` /
``load_state`` and resume are exactly those of a data-parallel run, and only the main process writes them. The
same code runs on the CPU (gloo, tested with two processes) and on GPUs (NCCL; ``bench/gpu_flux.sh``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EveryRankError, UserError
from ..core.quantize import LIBRARIES
from .settings import TrainSettings

logger = logging.getLogger("qrlora.sharding")

CONFIG = "configs/accelerate_fsdp.yaml"
HOW_TO_LAUNCH = f"launch with `accelerate launch --config_file {CONFIG} --num_processes N -m qrlora.train ...`"


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _flag(name: str, default: bool = False) -> bool:
    value = _env(name, str(default)).lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise UserError(f"{name}={os.environ[name]!r} (from the accelerate FSDP config) is not true or false")


@dataclass(frozen=True)
class ShardPlan:
    """The FSDP settings of an accelerate launch that ``shard_base`` applies."""

    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (FSDP2's default)
    wrap_classes: tuple[str, ...] = ()  # fsdp_transformer_layer_cls_to_wrap; empty: the backbone's shard units


# FSDP1 sharding strategies accelerate also accepts for fsdp_reshard_after_forward.
_RESHARD = {"true": True, "false": False, "full_shard": True, "hybrid_shard": True, "shard_grad_op": False,
            "no_shard": False, "hybrid_shard_zero2": False}


def fsdp_settings() -> ShardPlan:
    """The ``FSDP_*`` variables ``accelerate launch`` set from the FSDP config, as a ``ShardPlan``.

    Raises:
        UserError: one line for a setting this trainer does not implement (FSDP1, parameter offload, accelerate's
            low-RAM loading, its activation checkpointing, another auto-wrap policy).
    """
    version = _env("FSDP_VERSION", "2")
    if version != "2":
        raise UserError(f"fsdp_version {version}: qrlora shards with FSDP2 (torch's fully_shard); set fsdp_version: 2 "
                        f"in the accelerate config (as {CONFIG} does)")
    refused = {
        "FSDP_OFFLOAD_PARAMS": "fsdp_offload_params: parameter offload is not supported with the adapter trainer; "
                               "use more processes, or --blocks_to_swap without FSDP",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": "fsdp_cpu_ram_efficient_loading is not supported: every process loads the "
                                          "base and decomposes its own adapter bases; set it to false",
        "FSDP_ACTIVATION_CHECKPOINTING": "fsdp_activation_checkpointing is not supported; set it to false and pass "
                                         "--gradient_checkpointing to the trainer",
    }
    for name, why in refused.items():
        if _flag(name):
            raise UserError(why)
    policy = _env("FSDP_AUTO_WRAP_POLICY").upper()
    if policy not in ("", "TRANSFORMER_BASED_WRAP"):
        raise UserError(f"fsdp_auto_wrap_policy {policy}: qrlora shards the frozen base one transformer block at a "
                        f"time; use TRANSFORMER_BASED_WRAP or leave it out (as {CONFIG} does)")
    reshard = _env("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in _RESHARD:
        raise UserError(f"fsdp_reshard_after_forward {reshard!r}: expected true or false")
    classes = tuple(c.strip() for c in _env("FSDP_TRANSFORMER_CLS_TO_WRAP").split(",") if c.strip())
    return ShardPlan(reshard_after_forward=_RESHARD[reshard], wrap_classes=classes)


def fsdp_launch(settings: TrainSettings) -> ShardPlan | None:
    """Claim an accelerate FSDP launch for ``shard_base``; None when the launch is not one (``ACCELERATE_USE_FSDP``).

    Call before anything builds accelerate's state (``PartialState``, ``Accelerator``): this is where the launch
    becomes data parallel for accelerate (``ACCELERATE_USE_FSDP`` off; on a machine without CUDA,
    ``ACCELERATE_USE_CPU`` on) and its state is built, so the processes join one group (gloo on the CPU).

    Raises:
        UserError: a setting or flag that cannot work sharded, or no process group to shard over.
    """
    if _env("ACCELERATE_USE_FSDP").lower() not in ("1", "true", "yes"):
        return None
    try:
        plan = _checked_launch(settings)
    except EveryRankError:
        raise
    except UserError as err:  # every process reads the same settings: rank 0 says it, once
        raise EveryRankError(str(err)) from None
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_FSDP"] = "false"  # accelerate runs data parallel; shard_base does the sharding
    cpu = not torch.cuda.is_available()
    if cpu:  # else accelerate leaves every CPU process alone (its state would be "not distributed")
        os.environ["ACCELERATE_USE_CPU"] = "true"
    PartialState(cpu=cpu)  # accelerate's state from here on: the process group forms now (NCCL, or gloo on the CPU)
    return plan


def _checked_launch(settings: TrainSettings) -> ShardPlan:
    """The launch's ``ShardPlan``, or a ``UserError`` for a setting or flag that cannot work sharded."""
    plan = fsdp_settings()
    if settings.blocks_to_swap:
        raise UserError("--blocks_to_swap cannot be combined with an FSDP launch (the sharded base is gathered one "
                        "block at a time already); drop one of them")
    if settings.base_precision in LIBRARIES:
        raise UserError(f"--base_precision {settings.base_precision} cannot be combined with an FSDP launch (quantized "
                        "weights do not shard); use --base_precision bf16")
    if settings.validation_prompt:
        raise UserError("--validation_prompt cannot be combined with an FSDP launch (validation runs on the main "
                        "process only, a sharded base needs every process); render the saved adapter afterwards "
                        "(python -m qrlora.merge or the model card's snippet)")
    if not (_env("LOCAL_RANK") and _env("MASTER_ADDR")):
        raise UserError(f"ACCELERATE_USE_FSDP is set but no process group can form (LOCAL_RANK / MASTER_ADDR unset); "
                        f"{HOW_TO_LAUNCH}")
    return plan


@dataclass
class ShardReport:
    """What ``shard_base`` did on this process."""

    world: int
    units: int
    base_params: int  # frozen parameters of the whole base (elements)
    local_params: int  # of those, the elements this process holds

    def __str__(self) -> str:
        return (f"FSDP: frozen base sharded over {self.world} process{'es' if self.world > 1 else ''} in "
                f"{self.units} blocks + the root: "
                f"{self.local_params / 1e6:.3f} M of {self.base_params / 1e6:.3f} M parameters on each")


def _units(backbone, denoiser: nn.Module, plan: ShardPlan) -> list[nn.Module]:
    """The modules sharded as their own unit, innermost first (FSDP2 wants children before parents)."""
    if not plan.wrap_classes:
        return list(backbone.shard_units(denoiser))
    found = {type(m).__name__ for m in denoiser.modules()}
    missing = [c for c in plan.wrap_classes if c not in found]
    if missing:
        default = sorted({type(m).__name__ for m in backbone.shard_units(denoiser)})
        raise UserError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which the {backbone.name} "
                        f"denoiser does not have (its blocks: {', '.join(default) or 'none'}); leave the setting out "
                        "to shard the backbone's own blocks")
    return [m for m in reversed(list(denoiser.modules())) if type(m).__name__ in plan.wrap_classes and m is not denoiser]


def shard_base(backbone, denoiser: nn.Module, device: torch.device, plan: ShardPlan) -> ShardReport:
    """Shard every frozen parameter of ``denoiser`` over the process group and put the model on ``device``.

    Call after the adapters are injected (and the base cast), instead of ``denoiser.to(device)``: each process moves
    only its own shards of the base to ``device``, and the replicated rest (the adapters' parameters, every buffer).
    Then ``prepare_sharded`` instead of ``accelerator.prepare``.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise UserError(f"an FSDP launch needs a process group and none was formed; {HOW_TO_LAUNCH}")
    trainable = {p for p in denoiser.parameters() if p.requires_grad}
    base_params = sum(p.numel() for p in denoiser.parameters() if not p.requires_grad)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    try:
        units = _units(backbone, denoiser, plan)
    except UserError as err:  # the same model on every process: rank 0 says it, once
        raise EveryRankError(str(err)) from None
    for unit in units + [denoiser]:
        fully_shard(unit, mesh=mesh, reshard_after_forward=plan.reshard_after_forward,
                    ignored_params={p for p in unit.parameters() if p in trainable})
    with torch.no_grad():  # not denoiser.to(device): .to() on FSDP2-managed parameters may try to swap them
        for module in denoiser.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    p.data = p.data.to(device)
            for name, b in module.named_buffers(recurse=False):
                module._buffers[name] = b.to(device)
    # DDP (prepare_sharded) must see only the adapter's parameters (averaged gradients), never a sharded parameter
    # (a DTensor) or a buffer (the adapters' bases, which DDP would broadcast on every forward).
    denoiser._ddp_params_and_buffers_to_ignore = [n for n, p in denoiser.named_parameters() if not p.requires_grad] + \
        [n for n, _ in denoiser.named_buffers()]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for p in denoiser.parameters() if not p.requires_grad)
    report = ShardReport(world=dist.get_world_size(), units=len(units), base_params=base_params, local_params=local)
    logger.info(str(report))
    return report


def prepare_sharded(accelerator, denoiser: nn.Module, *objects):
    """``accelerator.prepare(denoiser, *objects)`` for a denoiser ``shard_base`` sharded.

    accelerate refuses a model with DTensor parameters under DDP on GPUs, so the denoiser is prepared here:
    accelerate's own mixed-precision forward (``prepare_model`` in evaluation mode: autocast and float32 outputs,
    no DDP), then DDP over the adapter's parameters alone when there are several processes (the same DDP the
    data-parallel path gets, on the CPU too). accelerate prepares the optimizer and the scheduler as usual.
    """
    from torch.nn.parallel import DistributedDataParallel

    model = accelerator.prepare_model(denoiser, device_placement=False, evaluation_mode=True)
    if accelerator.num_processes > 1:
        on_gpu = accelerator.device.type == "cuda"
        model = DistributedDataParallel(model, device_ids=[accelerator.device.index] if on_gpu else None,
                                        output_device=accelerator.device.index if on_gpu else None)
    return (model, *accelerator.prepare(*objects))
