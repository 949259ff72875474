"""How the trainer was launched: refuse launches that would train wrongly, before anything is written.

A launcher that starts several processes without a process group accelerate can join (``torchrun`` on a CPU
machine, or a stray ``WORLD_SIZE`` in the environment) leaves every process believing it is process 0 of 1:
each would train alone and write the same run folder. That is stopped with one line saying how to launch.
FSDP launches (``ACCELERATE_USE_FSDP``) are claimed before this check by ``qrlora.training.sharding.fsdp_launch``.
"""
from __future__ import annotations

import os

from ..errors import UserError

HOW_TO_LAUNCH = ("launch with `accelerate launch --num_processes N -m qrlora.train ...` (add --cpu on a machine "
                 "without GPUs), or a wrapper with GPU ids (`bash flux_dir/train_QR.sh 0,1 RANK`)")


def check_launch() -> None:
    """Refuse a multi-process launch that accelerate would run as independent single processes.

    Raises:
        UserError: ``WORLD_SIZE`` > 1 but no process group can form (no ``MASTER_ADDR``), or accelerate sees
            one process.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1:
        return
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "?"))
    where = f"this process is rank {rank} of WORLD_SIZE={world}"
    if not os.environ.get("MASTER_ADDR"):
        raise UserError(f"{where} but no MASTER_ADDR is set, so no process group can form; {HOW_TO_LAUNCH}")
    from accelerate import PartialState

    if PartialState().num_processes == 1:
        raise UserError(f"{where} but accelerate runs it as a single process (every process would train alone "
                        f"and write the same run folder); {HOW_TO_LAUNCH}")
