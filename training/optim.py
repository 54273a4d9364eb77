"""AdamW with decay/no-decay parameter groups, the per-step warm-up + cosine schedule, and an
exponential moving average of the weights."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, every 1-D parameter and model.no_weight_decay() (the RoIs)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    # The fused (single-kernel) AdamW: same update, ~2.5x faster step than the per-parameter loop on CPU.
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused
    )


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up from warmup_lr to base_lr
    over warmup_steps, then half a cosine from base_lr to min_lr at total_steps."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t))


class EMA:
    """Exponential moving average of parameters and buffers: ema ← d·ema + (1 − d)·model, with the
    usual warm-up d_t = min(decay, (1 + t) / (10 + t)) so that short runs do not average in the
    random init (with d = 0.9999 it only matters for the first ~10^5 steps)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_p = list(self.module.parameters()) + list(self.module.buffers())
        model_p = list(model.parameters()) + list(model.buffers())
        floats = [(e, m) for e, m in zip(ema_p, model_p, strict=True) if e.dtype.is_floating_point]
        torch._foreach_lerp_([e for e, _ in floats], [m.detach() for _, m in floats], 1.0 - decay)
        for e, m in zip(ema_p, model_p, strict=True):
            if not e.dtype.is_floating_point:
                e.copy_(m)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]
