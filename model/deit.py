"""DeiT (Touvron et al. 2021) dense baselines for side-by-side benchmarks: a plain ViT with a
class token, learned position embeddings and patch 16 (DeiT's architecture, no distillation token)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import tome
from .inputs import check_dtype
from .sparseformer import drop_path

VARIANTS: dict[str, dict] = {
    "deit_tiny": dict(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    "deit_small": dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
}


class Attention(nn.Module):
    """x (B, T, d) -> (B, T, d); with return_keys also the keys averaged over heads (B, T, d / heads)
    (ToMe's matching metric). attn_mask: (B, 1, 1, T) boolean (True = attend; A-ViT's halted tokens)
    or additive float (ToMe's log token sizes, proportional attention)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, return_keys: bool = False):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, T, d))
        return (out, k.mean(dim=1)) if return_keys else out


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, drop_prob: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))
        self.drop_prob = drop_prob

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """x (B, T, d) -> (B, T, d); attn_mask as in Attention."""
        x = x + drop_path(self.attn(self.norm1(x), attn_mask), self.drop_prob, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training)

    def forward_merging(self, x: Tensor, size: Tensor, r: int) -> tuple[Tensor, Tensor]:
        """ToMe's block (model/tome.py): attention with log-size logits, then r merges, then the MLP.
        x (B, T, d), size (B, T, 1) tokens merged into each -> (B, T - r', d), (B, T - r', 1)."""
        out, keys = self.attn(self.norm1(x), size.log().transpose(1, 2)[:, None], return_keys=True)
        x = x + drop_path(out, self.drop_prob, self.training)
        x, size = tome.merge_wavg(tome.bipartite_soft_matching(keys, r), x, size)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_prob, self.training), size


class DeiT(nn.Module):
    """images (B, in_chans, img_size, img_size) -> logits (B, classes)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: int = 4,
        drop_path_rate: float = 0.0,
        tome_r: int = 0,
    ):
        """tome_r: ToMe's merges per block (model/tome.py; 0 = plain DeiT); a setting, not a weight,
        so a trained DeiT runs with any r."""
        super().__init__()
        if not isinstance(tome_r, int) or tome_r < 0:
            raise ValueError(f"DeiT: tome_r={tome_r!r} must be a non-negative integer (0 = no token merging)")
        self.tome_r = tome_r
        if img_size % patch_size:
            raise ValueError(f"DeiT: img_size={img_size} must be a multiple of patch_size={patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"DeiT: embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # (cpu: buildable on the meta device)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def check_input(self, x: Tensor) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"DeiT expects images (B, {', '.join(map(str, expected))}), got {shape}; "
                             "create it with img_size=<resolution> for other sizes")
        check_dtype(self, x)

    def embed(self, x: Tensor) -> Tensor:
        """images (B, C, H, W) -> tokens (B, 1 + T, d), the class token first."""
        self.check_input(x)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, d)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        if self.tome_r:
            size = x.new_ones(x.shape[0], x.shape[1], 1)
            for block in self.blocks:
                x, size = block.forward_merging(x, size, self.tome_r)
        else:
            for block in self.blocks:
                x = block(x)
        return self.head(self.norm(x)[:, 0])
