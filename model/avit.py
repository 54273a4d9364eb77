"""A-ViT, adaptive tokens (Yin et al., CVPR 2022, arXiv 2112.07658), on our DeiT (model/deit.py).

After every block l, each token k halts with score h_k^l = σ(γ·t_{k,0}^l − β) read from its embedding
channel 0 (Eq. 3; γ = 10, β = 30 for Tiny and 75 for Small as in the released scripts), h = 1 at the last
block. A token halts at the first block N_k where Σ_{l≤N_k} h_k^l ≥ 1 − ε (Eq. 4), with remainder
R_k = 1 − Σ_{l<N_k} h_k^l; ponder ρ_k = N_k + R_k (Eq. 5). The output is the mean field of the class
token, o = Σ_{l<N_0} h_0^l t_0^l + R_0 t_0^{N_0} (Eq. 6). Losses beside the task loss (Eq. 9):
ponder α_p·mean ρ (5e-4) and the distributional prior α_d·KL(N(target_depth, 1) ‖ H) over depth (the released code's
direction), H
the halting scores averaged over the batch and tokens per block, normalised (Eq. 8; 1e-3).

Training masks halted tokens (their input is zeroed and no token attends to them), as the paper does.
Inference removes them ("token zipping"): every block sees only the tokens still running, packed to
the longest row of the batch (padding masked), and a sample leaves the batch once its class token has
halted, since the output no longer depends on it; the logits equal the masked forward's."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .deit import DeiT

VARIANTS: dict[str, dict] = {
    "avit_tiny": dict(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1, gate_scale=10.0, gate_center=30.0),
    "avit_small": dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1, gate_scale=10.0, gate_center=75.0),
}


class AViT(DeiT):
    """images (B, in_chans, img_size, img_size) -> logits (B, classes); after a training forward,
    `auxiliary_loss()` is the ponder + distributional-prior loss of that forward and `last_depths`
    (B, 1 + T) the blocks each token ran (N_k)."""

    def __init__(self, *args, gate_scale: float = 10.0, gate_center: float = 30.0, eps: float = 0.01,
                 ponder_weight: float = 5e-4, distr_weight: float = 1e-3, target_depth: float | None = None,
                 **kwargs):
        """target_depth: the mean of the Gaussian prior over halting depth (blocks); None = 7/12 of the depth
        (the released scripts' 7 of DeiT's 12)."""
        if kwargs.get("tome_r"):
            raise ValueError("AViT: tome_r must be 0; A-ViT halts tokens, ToMe merges them: pick one")
        super().__init__(*args, **kwargs)
        depth = len(self.blocks)
        target_depth = depth * 7 / 12 if target_depth is None else float(target_depth)
        if not 0 < eps < 1:
            raise ValueError(f"AViT: eps={eps} must be in (0, 1)")
        if not 0 < target_depth <= depth:
            raise ValueError(f"AViT: target_depth={target_depth} must be in (0, depth={depth}]")
        self.gate_scale, self.gate_center, self.eps = gate_scale, gate_center, eps
        self.ponder_weight, self.distr_weight, self.target_depth = ponder_weight, distr_weight, target_depth
        self._aux: Tensor | None = None
        self.last_depths = self.last_ponder = self.last_kl = None

    def halting(self, x: Tensor, layer: int) -> Tensor:
        """h (B, T) of block `layer`'s output x (B, T, d): Eq. 3, and 1 at the last block."""
        if layer == len(self.blocks) - 1:
            return x.new_ones(x.shape[:2])
        return torch.sigmoid(self.gate_scale * x[..., 0] - self.gate_center)

    def prior(self, device) -> Tensor:
        """The target distribution over depth 1..L: a unit Gaussian at target_depth, normalised (L,)."""
        depth = torch.arange(1, len(self.blocks) + 1, dtype=torch.float32, device=device)
        p = torch.exp(-0.5 * (depth - self.target_depth) ** 2) / math.sqrt(2 * math.pi)
        return p / p.sum()

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        if self.training or torch.is_grad_enabled():
            return self.forward_masked(x)
        return self.forward_zipped(x)

    def forward_masked(self, x: Tensor) -> Tensor:
        """tokens (B, T, d) -> logits, every token through every block, halted ones masked (training)."""
        B, T, _ = x.shape
        cum = x.new_zeros(B, T)  # Σ h so far
        remainder = x.new_ones(B, T)
        rho = x.new_zeros(B, T)
        running = torch.ones(B, T, dtype=torch.bool, device=x.device)
        out = x.new_zeros(B, x.shape[-1])
        mean_h = []
        eye = torch.eye(T, dtype=torch.bool, device=x.device)
        for layer, block in enumerate(self.blocks):
            # keys: the running tokens, and each token itself (a halted query must attend to something)
            x = block(x * running[..., None], (running[:, None, :] | eye)[:, None])
            h = self.halting(x, layer)
            mean_h.append(h.mean())
            cum = cum + h
            rho = rho + running
            reached = running & (cum >= 1 - self.eps)
            going = running & ~reached
            weight = torch.where(reached, remainder, torch.where(going, h, 0.0))  # Eq. 6's per-token weight
            out = out + weight[:, 0, None] * x[:, 0]
            rho = rho + torch.where(reached, remainder, 0.0)
            remainder = remainder - torch.where(going, h, 0.0)
            running = going
        self.last_depths = (rho.detach() - remainder.detach()).round()  # ρ − R: the blocks run
        distr = torch.stack(mean_h)
        distr = distr / distr.sum()
        kl = F.kl_div(distr.clamp_min(1e-12).log(), self.prior(x.device), reduction="sum")  # KL(prior ‖ H)
        self._aux = self.ponder_weight * rho.mean() + self.distr_weight * kl
        self.last_ponder, self.last_kl = rho.mean().detach(), kl.detach()
        return self.head(self.norm(out))

    @torch.no_grad()
    def forward_zipped(self, x: Tensor) -> Tensor:
        """tokens (B, T, d) -> logits with halted tokens removed (inference). Each block runs on the
        running tokens packed left (class token first) to the longest row; a sample whose class token
        halted leaves the batch."""
        B, T, d = x.shape
        out = x.new_zeros(B, d)
        self.last_kept = []  # (samples, tokens) each block ran on
        alive = torch.arange(B, device=x.device)  # rows of `out` still running
        cum, remainder = x.new_zeros(B, T), x.new_ones(B, T)
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        pos = torch.arange(T, device=x.device).expand(B, T)  # original token index of each slot
        for layer, block in enumerate(self.blocks):
            self.last_kept.append(tuple(x.shape[:2]))
            full = bool(valid.all())
            x = block(x, None if full else valid[:, None, None, :])
            h = self.halting(x, layer)
            cum = cum + h
            reached = valid & (cum >= 1 - self.eps)
            going = valid & ~reached
            weight = torch.where(reached[:, 0], remainder[:, 0], h[:, 0])
            out[alive] += weight[:, None] * x[:, 0]
            remainder = remainder - torch.where(going, h, 0.0)
            keep = going[:, 0]  # the class token still runs
            if not keep.any():
                break
            # drop finished samples, then pack the running tokens left and cut to the longest row
            x, cum, remainder, going, pos, alive = (t[keep] for t in (x, cum, remainder, going, pos, alive))
            n = int(going.sum(1).max())
            order = torch.sort((~going).to(torch.int8), dim=1, stable=True).indices[:, :n]  # running first
            x = x.gather(1, order[..., None].expand(-1, -1, d))
            cum, remainder, valid, pos = (t.gather(1, order) for t in (cum, remainder, going, pos))
        return self.head(self.norm(out))

    def __getstate__(self):  # copies (EMA, pickling) drop the last forward's graph
        state = super().__getstate__()
        return {**state, "_aux": None, "last_depths": None, "last_ponder": None, "last_kl": None}

    def auxiliary_loss(self) -> Tensor:
        """The ponder + distributional-prior loss of the last training forward (train.py adds it)."""
        if self._aux is None:
            raise RuntimeError("AViT.auxiliary_loss(): run a training forward first")
        return self._aux
