"""Batch augmentation on the device: the part of the DeiT/SparseFormer recipe that works on whole
batches (timm's RandAugment, data/randaugment.py; normalisation, random erasing, Mixup/CutMix +
label smoothing). Random draws use torch's global generators (the CPU's for the parameters, the
device's for erasing's noise), which the checkpoint saves, so a resumed run replays them."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .randaugment import _to


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


class RandomErasing(nn.Module):
    """timm's RandomErasing(mode="pixel", max_count=1), DeiT's `--reprob --remode pixel`, on a batch of
    normalised images: each image, with probability p, gets one box of area U(scale) x H x W and
    aspect ratio h/w log-uniform in `ratio`, filled with per-pixel, per-channel N(0, 1) noise. The box's
    side lengths are rounded and must be smaller than the image's; up to `attempts` draws, else nothing
    is erased. Parameters are drawn on the CPU (forward_parameters: no host sync), the noise on x's device.

    params["group"] (B,) names whose noise each image takes: images with the same group share it (all
    frames of a clip, data/video_augment.py, so that erasing adds no flicker)."""

    def __init__(self, p: float = 0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), attempts: int = 10):
        super().__init__()
        if not 0 <= p <= 1 or not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"RandomErasing: p={p} must be in [0, 1], scale={list(scale)} 0 < min <= max <= 1, "
                             f"ratio={list(ratio)} 0 < min <= max")
        self.p, self.scale, self.attempts = p, tuple(scale), attempts
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def forward_parameters(self, shape: torch.Size) -> dict:
        """For images of shape (B, C, H, W), on the CPU: box (B, 4) as (top, left, h, w), apply (B,),
        group (B,) = arange(B)."""
        B, H, W = shape[0], shape[-2], shape[-1]
        area = torch.empty(B, self.attempts).uniform_(*self.scale) * (H * W)
        aspect = torch.empty(B, self.attempts).uniform_(*self.log_ratio).exp_()
        h, w = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
        fits = (h < H) & (w < W)
        first = fits.float().argmax(1, keepdim=True)  # the first attempt that fits (timm's loop)
        h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
        top = (torch.rand(B) * (H - h + 1)).long().clamp_(max=H - 1)  # randint(0, H - h), as random.randint
        left = (torch.rand(B) * (W - w + 1)).long().clamp_(max=W - 1)
        apply = (torch.rand(B) < self.p) & fits.any(1)
        return {"box": torch.stack([top, left, h, w], 1), "apply": apply, "group": torch.arange(B)}

    @torch.no_grad()
    def forward(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"RandomErasing expects images (B, C, H, W), got shape {tuple(x.shape)}")
        params = params if params is not None else self.forward_parameters(x.shape)
        if not bool(params["apply"].any()):  # CPU tensors: no host sync
            return x
        B, C, H, W = x.shape
        top, left, h, w = (_to(v, x.device)[:, None, None] for v in params["box"].unbind(1))
        ys = torch.arange(H, device=x.device)[None, :, None]
        xs = torch.arange(W, device=x.device)[None, None, :]
        inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) \
            & _to(params["apply"], x.device)[:, None, None]  # (B, H, W)
        groups = params["group"]
        noise = torch.randn(int(groups.max()) + 1, C, H, W, device=x.device, dtype=x.dtype)[_to(groups, x.device)]
        return torch.where(inside[:, None], noise, x)


class BatchTransform(nn.Module):
    """uint8 (B, C, H, W) on the device -> normalised float (B, C, H, W) and targets:
    soft (B, K) for training, the (B,) labels for evaluation."""

    def __init__(self, mean, std, num_classes: int, train: bool, randaugment: dict | None = None,
                 random_erasing: float = 0.0, mixup: dict | None = None, label_smoothing: float = 0.0):
        super().__init__()
        if len(mean) != len(std):  # one std for three channels would broadcast silently
            raise ValueError(f"BatchTransform: mean has {len(mean)} values and std {len(std)}: give one per channel")
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
            self.erasing = RandomErasing(p=random_erasing)  # timm's "pixel" mode: N(0, 1) noise after normalising
        mix = mixup or {"prob": 0.0}
        self.mix = MixupCutmix(num_classes, label_smoothing=label_smoothing, **mix) if train else None

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

