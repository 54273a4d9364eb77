"""The frame-order-blind video baseline: an image model run on every frame, its logits averaged over
the frames. The mean over frames is invariant to any permutation of them, so the model sees a clip
only as the multiset of its frames; on moving digits (`data/moving_digits.py`) such a model is
capped at 50% top-1, which is what this baseline is for."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from .inputs import check_clip_layout

VARIANTS: dict[str, dict] = {
    "framewise_sparseformer_nano": dict(image_model="sparseformer_nano"),
}


class FrameAveraged(nn.Module):
    """clips (B, C, T, H, W) -> logits (B, classes) = mean over t of image_model(frame t).

    `image_model` is a module or a registered image model's name, built with `create_model(name,
    num_classes=..., in_chans=..., **image_kwargs)` (None keeps that model's default)."""

    takes_clips = True

    def __init__(self, image_model: str | nn.Module = "sparseformer_nano", num_classes: int | None = None,
                 in_chans: int | None = None, image_kwargs: dict | None = None):
        super().__init__()
        if isinstance(image_model, str):
            from .factory import create_model  # the factory may register this module: import late

            given = {"num_classes": num_classes, "in_chans": in_chans}
            image_model = create_model(image_model, **{k: v for k, v in given.items() if v is not None},
                                       **(image_kwargs or {}))
        elif num_classes is not None or in_chans is not None or image_kwargs:
            raise ValueError("FrameAveraged: num_classes / in_chans / image_kwargs apply only when image_model "
                             "is a name; configure the module you pass yourself")
        self.image_model = image_model
        self.in_chans = getattr(image_model, "in_chans", None)
        self.num_classes = getattr(image_model, "num_classes", None)

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.image_model, "no_weight_decay", lambda: set())()
        return {f"image_model.{name}" for name in inner}

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"FrameAveraged expects clips (B, C, T, H, W), got {shape}")
        if self.in_chans is not None:
            check_clip_layout(self, x, self.in_chans)
        B, C, T, H, W = x.shape
        logits = self.image_model(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B·T, K), frame-major per clip
        return logits.view(B, T, -1).mean(1)
