"""timm's RandAugment (`rand-m{m}-n{n}-mstd{mstd}-inc1`, the DeiT / SparseFormer and VideoMAE recipes)
on whole batches on the device, with per-sample draws.

Per sample, each of `n` layers picks one of the 15 ops below uniformly (with replacement over the
layers), applies it with probability `p` (timm: 0.5), at a magnitude drawn from N(m, mstd) clipped
to [0, 10] (timm's `magnitude_std`), and a random sign for the signed ops. The "increasing" variants
(`inc1`): a larger magnitude is always a stronger change. Level -> argument, as timm maps them:

| op | argument at level v (0..10) |
|---|---|
| AutoContrast, Equalize, Invert | none |
| Rotate | ±30·v/10 degrees, about the centre |
| ShearX, ShearY | ±0.3·v/10 |
| TranslateXRel, TranslateYRel | ±0.45·v/10 of the width / height |
| PosterizeIncreasing | keep 4 - int(4·v/10) bits |
| SolarizeIncreasing | invert pixels >= 256 - int(256·v/10) |
| SolarizeAdd | add int(110·v/10) to pixels < 128 |
| Color/Contrast/Brightness/SharpnessIncreasing | enhance factor 1 ± 0.9·v/10 (PIL ImageEnhance) |

Geometric ops fill with the dataset mean pixel (timm's `img_mean`) and sample bilinearly (DeiT's timm
transform passes bicubic there; torch's bicubic kernel is not PIL's, so bilinear, tested against PIL's). Images
are float (B, C, H, W) in [0, 1] (uint8 levels / 255). Random draws come from torch's global CPU
generator (saved in checkpoints), made on the CPU so that choosing each op's samples needs no host
sync; `forward_parameters` / `forward(x, params=...)` let `video_augment.SameOnFrames` give every
frame of a clip its clip's draw.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are on 0..10


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L (ITU-R 601-2 luma), (B, 1, H, W); a 1-channel image is its own grey."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: degenerate + factor · (x - degenerate), clipped to [0, 1]."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 1)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Each channel stretched to [0, 1] from its own min and max (PIL ImageOps.autocontrast, cutoff 0)."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each channel's 256 levels (PIL ImageOps.equalize)."""
    B, C, H, W = x.shape
    levels = (x * 255).round_().long().clamp_(0, 255).view(B * C, H * W)
    hist = torch.zeros(B * C, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    # PIL: step = (pixels - count of the last non-zero level) // 255; identity when step is 0
    last = hist.gather(1, (hist > 0).float().cumsum(1).argmax(1, keepdim=True))
    step = torch.div(H * W - last, 255, rounding_mode="floor")
    lut = torch.div(hist.cumsum(1) - hist + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1),
                    rounding_mode="floor").clamp_(0, 255)
    out = lut.gather(1, levels) / 255
    out = torch.where(step > 0, out, levels / 255)
    return out.view(B, C, H, W)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the `bits` (B,) high bits of each 8-bit level."""
    levels = (x * 255).round_().long()
    mask = (255 - (2 ** (8 - bits.long()) - 1)).view(-1, 1, 1, 1)
    return (levels & mask).float() / 255


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert the levels >= threshold (B,) (in 0..256)."""
    return torch.where(x * 255 >= threshold.view(-1, 1, 1, 1) - 1e-3, 1 - x, x)


def solarize_add(x: torch.Tensor, add: torch.Tensor, threshold: float = 128) -> torch.Tensor:
    """Add `add` (B,) levels to the levels below threshold, clipped at 255."""
    return torch.where(x * 255 < threshold - 1e-3, (x + add.view(-1, 1, 1, 1) / 255).clamp(max=1), x)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (3x3 kernel 1 1 1 / 1 5 1 /
    1 1 1 over 13), whose border pixels are the original's."""
    C = x.shape[1]
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(C, 1, 3, 3)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=C)
    return _blend(smooth, x, factor)


def affine(x: torch.Tensor, matrix: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Each image resampled (bilinear) at matrix (B, 2, 3) @ (x, y, 1) of its output pixels, in pixel
    units about the centre; what falls outside takes `fill` (C,)."""
    B, C, H, W = x.shape
    ys, xs = torch.meshgrid(torch.arange(H, device=x.device, dtype=x.dtype) - (H - 1) / 2,
                            torch.arange(W, device=x.device, dtype=x.dtype) - (W - 1) / 2, indexing="ij")
    grid = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, H * W, 3)
    src = grid @ matrix.to(x.dtype).transpose(1, 2)  # (B, H*W, 2) source pixel (about the centre)
    norm = torch.stack([src[..., 0] / (W / 2), src[..., 1] / (H / 2)], -1).view(B, H, W, 2)
    fill = fill.view(1, -1, 1, 1).to(x.dtype)
    return F.grid_sample(x - fill, norm, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _to(t: torch.Tensor, device: torch.device, dtype=None) -> torch.Tensor:
    """A CPU draw onto the device without waiting for it: pinned first (a copy from pageable memory
    waits for the stream), then copied asynchronously."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, dtype, non_blocking=True)


class RandAugment(nn.Module):
    """timm's RandAugment on a batch: x float (B, C, H, W) in [0, 1] -> the same, augmented per sample."""

    def __init__(self, n: int = 2, m: float = 9.0, mstd: float = 0.5, p: float = 0.5,
                 fill=(0.485, 0.456, 0.406)):
        """fill: the pixel (one value per channel, in [0, 1]) the geometric ops fill with: the dataset mean."""
        super().__init__()
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"randaugment.n={n!r}: the number of ops per image, an integer >= 1")
        if not 0 <= m <= MAX_LEVEL:
            raise ValueError(f"randaugment.m={m!r}: timm's magnitude, in [0, 10] (rand-m9 is 9)")
        if mstd < 0 or not 0 <= p <= 1:
            raise ValueError(f"randaugment: mstd={mstd!r} must be >= 0 and p={p!r} in [0, 1]")
        self.n, self.m, self.mstd, self.p = n, float(m), float(mstd), float(p)
        self.register_buffer("fill", torch.tensor(fill, dtype=torch.float32), persistent=False)

    def forward_parameters(self, shape: torch.Size) -> dict:
        """The draws for a batch of shape (B, ...), on the CPU: op (B, n), apply (B, n), level (B, n),
        sign (B, n)."""
        B, n = shape[0], self.n
        level = self.m + self.mstd * torch.randn(B, n) if self.mstd > 0 else torch.full((B, n), self.m)
        return {"op": torch.randint(0, len(OPS), (B, n)), "apply": torch.rand(B, n) < self.p,
                "level": level.clamp_(0, MAX_LEVEL), "sign": torch.where(torch.rand(B, n) < 0.5, -1.0, 1.0)}

    @torch.no_grad()
    def forward(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != len(self.fill):
            raise ValueError(f"RandAugment expects images (B, {len(self.fill)}, H, W) (one fill value per channel), "
                             f"got shape {tuple(x.shape)}")
        params = params if params is not None else self.forward_parameters(x.shape)
        x = x.clone()
        for layer in range(self.n):
            op, chosen = params["op"][:, layer], params["apply"][:, layer]
            for k in range(len(OPS)):
                rows = torch.nonzero(chosen & (op == k)).flatten()  # CPU tensors: no host sync
                if rows.numel() == 0:
                    continue
                level, sign = params["level"][rows, layer], params["sign"][rows, layer]
                index = _to(rows, x.device)
                x[index] = self.apply_op(OPS[k], x[index], level, sign)
        return x

    def apply_op(self, name: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        """One op on the images x (b, C, H, W) at their levels (b,) and signs (b,) (CPU tensors)."""
        dev = x.device
        v = level / MAX_LEVEL
        if name == "AutoContrast":
            return autocontrast(x)
        if name == "Equalize":
            return equalize(x)
        if name == "Invert":
            return 1 - x
        if name == "PosterizeIncreasing":
            return posterize(x, _to(4 - (v * 4).long(), dev))
        if name == "SolarizeIncreasing":
            return solarize(x, _to((256 - (v * 256).long()).float(), dev))
        if name == "SolarizeAdd":
            return solarize_add(x, _to((v * 110).long().float(), dev))
        if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness: factor 1 ± 0.9 v
            factor = _to(1 + sign * 0.9 * v, dev, x.dtype)
            if name == "ColorIncreasing":
                return _blend(_gray(x).expand_as(x), x, factor)
            if name == "ContrastIncreasing":
                return _blend(_gray(x).mean((2, 3), keepdim=True).expand_as(x), x, factor)
            if name == "BrightnessIncreasing":
                return _blend(torch.zeros_like(x), x, factor)
            return sharpness(x, factor)
        H, W = x.shape[-2:]
        b = len(level)
        matrix = torch.zeros(b, 2, 3)
        matrix[:, 0, 0] = matrix[:, 1, 1] = 1
        if name == "Rotate":  # output pixel -> source pixel: the inverse rotation
            angle = sign * v * 30 * math.pi / 180
            matrix[:, 0, 0], matrix[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
            matrix[:, 1, 0], matrix[:, 1, 1] = torch.sin(angle), torch.cos(angle)
        elif name == "ShearX":  # PIL shears about the top-left corner: x_src = x + s·y there
            matrix[:, 0, 1] = sign * v * 0.3
            matrix[:, 0, 2] = matrix[:, 0, 1] * H / 2
        elif name == "ShearY":
            matrix[:, 1, 0] = sign * v * 0.3
            matrix[:, 1, 2] = matrix[:, 1, 0] * W / 2
        elif name == "TranslateXRel":
            matrix[:, 0, 2] = sign * v * 0.45 * W
        elif name == "TranslateYRel":
            matrix[:, 1, 2] = sign * v * 0.45 * H
        else:
            raise ValueError(f"unknown RandAugment op {name!r}")
        return affine(x, _to(matrix, dev), self.fill)
