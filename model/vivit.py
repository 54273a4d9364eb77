"""ViViT (Arnab et al. 2021), model 1 "spatio-temporal attention": the dense joint space-time baseline
for video. Non-overlapping tubelets (t × p × p voxels, a Conv3d) become tokens; a class token and
learned position embeddings are added and DeiT's blocks attend over all (T/t)·(H/p)·(W/p) + 1 tokens
at once. It is DeiT (model/deit.py) with a 3-D patch embedding: the blocks, head, initialisation and
forward are DeiT's."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .deit import DeiT
from .inputs import check_dtype

VARIANTS: dict[str, dict] = {
    # DeiT-S widths with ViViT's 2×16×16 tubelets: 16 frames at 224 -> 8·14·14 = 1568 tokens
    "vivit_small": dict(num_frames=16, tubelet_size=2, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                        drop_path_rate=0.1),
    # CPU-sized, for tests and the embedded moving-digits task (1×8×64×64 clips -> 4·8·8 = 256 tokens)
    "vivit_nano": dict(img_size=64, num_frames=8, tubelet_size=2, patch_size=8, in_chans=1, embed_dim=64, depth=2,
                       num_heads=4, drop_path_rate=0.0),
}


class ViViT(DeiT):
    """clips (B, in_chans, num_frames, img_size, img_size) -> logits (B, classes)."""

    takes_clips = True

    def __init__(
        self,
        img_size: int = 224,
        num_frames: int = 16,
        tubelet_size: int = 2,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 400,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: int = 4,
        drop_path_rate: float = 0.0,
    ):
        if not isinstance(num_frames, int) or not isinstance(tubelet_size, int) or tubelet_size < 1 \
                or num_frames < tubelet_size or num_frames % tubelet_size:
            raise ValueError(f"ViViT: num_frames={num_frames!r} must be a positive multiple of "
                             f"tubelet_size={tubelet_size!r}")
        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
                         drop_path_rate)
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        # the image patch embedding becomes a tubelet embedding; the position table grows to match
        self.patch_embed = nn.Conv3d(in_chans, embed_dim, kernel_size=(tubelet_size, patch_size, patch_size),
                                     stride=(tubelet_size, patch_size, patch_size))
        num_tokens = (num_frames // tubelet_size) * (img_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + 1, embed_dim))
        self.init_weights()

    def check_input(self, x: Tensor) -> None:
        expected = (self.in_chans, self.num_frames, self.img_size, self.img_size)
        if not isinstance(x, Tensor) or x.dim() != 5 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"ViViT expects clips (B, C, T, H, W) = (B, {', '.join(map(str, expected))}), "
                             f"got {shape}; create it with num_frames=<T>, img_size=<resolution>, in_chans=<C> "
                             "for other clips")
        check_dtype(self, x, "clips")
