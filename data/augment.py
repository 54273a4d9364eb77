"""Batch augmentation on the device: the part of the DeiT/SparseFormer recipe that works on whole
batches (timm's RandAugment, data/randaugment.py; normalisation, random erasing, Mixup/CutMix +
label smoothing). Random draws use torch's global generator, which the checkpoint saves, so a
resumed run replays them."""
from __future__ import annotations

import torch
import torch.nn as nn


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) labels -> (B, K) targets: 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
    off = smoothing / num_classes
    return torch.full((y.numel(), num_classes), off, device=y.device).scatter_(1, y[:, None], 1.0 - smoothing + off)


class MixupCutmix:
    """timm's batch-mode Mixup/CutMix: per batch, with probability `prob`, mix the batch with its
    reverse; CutMix (chosen with `switch_prob` when both are on) pastes a box whose area is 1 - λ,
    with λ corrected to the box actually pasted after clipping. λ ~ Beta(α, α)."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.1):
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.switch_prob, self.prob, self.label_smoothing = switch_prob, prob, label_smoothing

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), y (B,) -> mixed x (B, C, H, W), soft targets (B, K)."""
        target = smooth_one_hot(y, self.num_classes, self.label_smoothing)
        if not self.active or torch.rand(()).item() >= self.prob:
            return x, target
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or torch.rand(()).item() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = torch.distributions.Beta(alpha, alpha).sample().item()
        if use_cutmix:
            h, w = x.shape[-2:]
            cut = (1 - lam) ** 0.5
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = torch.randint(0, h, ()).item(), torch.randint(0, w, ()).item()
            y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            x = x.clone()
            x[..., y1:y2, x1:x2] = x.flip(0)[..., y1:y2, x1:x2]
            lam = 1 - (y2 - y1) * (x2 - x1) / (h * w)
        else:
            x = x * lam + x.flip(0) * (1 - lam)
        return x, target * lam + target.flip(0) * (1 - lam)


class BatchTransform(nn.Module):
    """uint8 (B, C, H, W) on the device -> normalised float (B, C, H, W) and targets:
    soft (B, K) for training, the (B,) labels for evaluation."""

    def __init__(self, mean, std, num_classes: int, train: bool, randaugment: dict | None = None,
                 random_erasing: float = 0.0, mixup: dict | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.train_mode, self.num_classes, self.label_smoothing = train, num_classes, label_smoothing
        self.randaugment = self.erasing = None
        if train and randaugment:
            from .randaugment import RandAugment

            unknown = set(randaugment) - {"n", "m", "mstd", "p"}
            if unknown:
                raise ValueError(f"data.augment.randaugment: unknown key(s) {sorted(unknown)}; known: n (ops per "
                                 "image), m (magnitude 0-10), mstd (its noise), p (each op's probability)")
            self.randaugment = RandAugment(**randaugment, fill=tuple(mean))  # timm's; fills with the mean pixel
        if train and random_erasing > 0:
            from kornia.augmentation import RandomErasing

            self.erasing = RandomErasing(p=random_erasing, value=0.0)  # 0 after normalising = mean pixel
        mix = mixup or {"prob": 0.0}
        self.mix = MixupCutmix(num_classes, label_smoothing=label_smoothing, **mix) if train else None

    def _apply(self, fn, *args, **kwargs):
        """`.to(cuda)` moves the buffers, not kornia's random samplers: kornia 0.9 would move those too,
        then draw each batch's parameters on the GPU and copy them back to the CPU, a blocking copy
        (a host sync) per batch. Drawn on the CPU, they reach the GPU by non-blocking copies."""
        out = super()._apply(fn, *args, **kwargs)
        for m in self.modules():
            if m is not self and hasattr(m, "set_rng_device_and_dtype"):
                m.set_rng_device_and_dtype(torch.device("cpu"), torch.float32)
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor):
        x = x.float().div_(255)
        if self.randaugment is not None:
            x = self.randaugment(x).clamp_(0, 1)
        x = (x - self.mean) / self.std
        if self.erasing is not None:
            x = self.erasing(x)
        if self.mix is None:
            return x, y
        return self.mix(x, y)

