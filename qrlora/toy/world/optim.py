"""The one learning-rate schedule the world's trainings share."""
from __future__ import annotations

import math

import torch


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int, floor: float = 0.1):
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` x the base rate at ``steps``."""
    warmup = max(1, warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(1, steps)))))
