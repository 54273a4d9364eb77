"""Batch augmentation of clips on the device: `BatchTransform`'s recipe (RandAugment, normalisation,
random erasing, Mixup/CutMix + label smoothing) with one set of random parameters per clip, shared by
all of its frames, so that augmentation never creates motion that is not in the video.

Frames are folded into the batch, (B, C, T, H, W) -> (B·T, C, H, W), and the per-sample parameters
(data/randaugment.py's, data/augment.py's random erasing's: its box and its noise), drawn for the B
clips, are repeated T times. Ops whose effect depends on the image itself (equalize, autocontrast)
still see each frame's own histogram, with the clip's parameters.
Mixup mixes whole clips and CutMix pastes the same box in every frame (`MixupCutmix` indexes the
last two axes, so it takes clips as they are).

Moving digits must not be flipped or rotated (the class is a direction); its config uses
normalisation only. Kinetics flips on the CPU, per clip (`data/kinetics.py`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .augment import BatchTransform


def repeat_params(params: dict, batch: int, times: int) -> dict:
    """Parameters drawn for `batch` samples (a dict of tensors whose first axis is the sample) -> the
    same parameters for `batch * times` samples, each repeated `times` times in a row (sample
    b·times + t gets sample b's draw)."""
    return {key: value.repeat_interleave(times, dim=0)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch else value
            for key, value in params.items()}


class SameOnFrames(nn.Module):
    """Apply an image augmentation with `forward_parameters(shape)` and `forward(x, params)`
    (RandAugment, RandomErasing) to clips with one draw per clip.
    x (B, C, T, H, W) -> (B, C, T, H, W)."""

    def __init__(self, aug: nn.Module):
        super().__init__()
        self.aug = aug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        params = self.aug.forward_parameters(torch.Size((B, C, H, W)))
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)
        out = self.aug(frames, params=repeat_params(params, B, T))
        return out.view(B, T, C, H, W).transpose(1, 2)


class VideoBatchTransform(BatchTransform):
    """uint8 clips on the device -> normalised float clips and targets, with `BatchTransform`'s
    arguments and forward. Training: x (B, C, T, H, W) -> x, soft targets (B, K). Evaluation: x
    (B, C, T, H, W) or test views (B, V, C, T, H, W) -> the same shape normalised, the (B,) labels."""

    def __init__(self, mean, std, num_classes: int, train: bool, **recipe):
        super().__init__(mean, std, num_classes, train, **recipe)
        self.mean = self.mean.unsqueeze(-1)  # (1, C, 1, 1, 1): broadcasts over T (and a leading view axis)
        self.std = self.std.unsqueeze(-1)
        if self.randaugment is not None:
            self.randaugment = SameOnFrames(self.randaugment)
        if self.erasing is not None:
            self.erasing = SameOnFrames(self.erasing)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        if x.dim() not in ((5,) if self.train_mode else (5, 6)):
            layout = "(B, C, T, H, W)" + ("" if self.train_mode else " or views (B, V, C, T, H, W)")
            raise ValueError(f"VideoBatchTransform expects clips {layout}, got shape {tuple(x.shape)}")
        if x.shape[-4] != self.mean.shape[1]:
            raise ValueError(f"VideoBatchTransform: clips have {x.shape[-4]} channels (shape {tuple(x.shape)}), "
                             f"the mean/std {self.mean.shape[1]}")
        return super().forward(x, y)
