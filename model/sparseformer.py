"""SparseFormer v1: sparse visual recognition with a few latent tokens (arXiv 2304.03768).

Faithful to the authors' trained code (docs/MODEL.md): where the paper's text and
that code disagree, this file follows the code, so the released ImageNet weights load and give
the same logits (`load_official_checkpoint`, at the bottom of this file).

Reads top-down: helpers -> early convolution -> RoI / sampling-point geometry -> adaptive mixing
-> blocks (cortex block, sampling block) -> the model -> named variants -> checkpoint conversion.
Tensors are batch-first inside this file: tokens (B, N, d), RoIs (B, N, 4), points (B, N, P, 2).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kernels import FeatureMap, adaptive_mix
from kernels.backend import BACKENDS, resolve_backend

from .hub import check_state_dict, find_state_dict, is_train_checkpoint, read_checkpoint
from .inputs import check_dtype

log = logging.getLogger(__name__)

LN_EPS = 1e-6  # every LayerNorm of the model (docs/MODEL.md, "A sampling block")
STD_EPS = 1e-7  # inside the stem's channel standardisation and the sampling-offset standardisation


def at_least_fp32(t: Tensor) -> Tensor:
    """RoI and sampling-point geometry runs in fp32 under AMP (MODEL.md steps 2-3), fp64 stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth with one Bernoulli mask per sample of the batch axis 0. x (B, ...)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class _Recompute(torch.autograd.Function):
    """y = fn(x) keeping only x (and the parameters, passed in so that their gradients reach
    autograd and DDP's hooks as usual) for backward, where fn runs again under the forward's
    autocast state and, when fn draws random numbers (`random`), its RNG state (so drop-path masks
    repeat). A deterministic fn (the stem) touches no RNG state: CUDA's generator refuses to be read
    inside a CUDA-graph capture, so such a region can be captured."""

    @staticmethod
    def forward(ctx, fn, random: bool, x: Tensor, *params: Tensor):
        ctx.fn, ctx.device, ctx.random = fn, x.device, random
        kind = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        if random:
            if kind == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("a recomputed block with stochastic depth cannot be captured in a CUDA graph "
                                   "(its RNG state cannot be saved during capture): set checkpoint_cortex=False "
                                   "or drop_path_rate=0 to capture it")
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if kind == "cuda" else None
        ctx.save_for_backward(x, *params)
        return fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, *params = ctx.saved_tensors
        kind = ctx.device.type
        with contextlib.ExitStack() as stack:
            if ctx.random:
                stack.enter_context(torch.random.fork_rng(devices=[ctx.device] if kind == "cuda" else [],
                                                          device_type="cuda"))
                torch.set_rng_state(ctx.cpu_rng)
                if ctx.cuda_rng is not None:
                    torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
                x_in = x.detach().requires_grad_(ctx.needs_input_grad[2])
                y = ctx.fn(x_in)
        wanted = [t for t, need in zip([x_in, *params], ctx.needs_input_grad[2:], strict=True) if need]
        grads = iter(torch.autograd.grad(y, wanted, grad, allow_unused=True))
        return (None, None, *[next(grads) if need else None for need in ctx.needs_input_grad[2:]])


def recompute(fn, x: Tensor, params: list[Tensor], random: bool = True) -> Tensor:
    """fn(x) whose activations are recomputed in backward instead of kept (x (B, ...) -> fn's output);
    `random=False` for an fn that draws no random numbers (its RNG state is then not saved)."""
    return _Recompute.apply(fn, random, x, *params)


# ----------------------------------------------------------------------------- early convolution
def _stem_patches(x: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """x (B, C, H, W) -> (B * Ho * Wo, 7 * 7 * C): the zero-padded 7x7/2 patches, (ky, kx, c) fastest last."""
    B, C, H, W = x.shape
    Ho, Wo = out_hw
    xp = F.pad(x, (3, 2 * Wo + 2 - W, 3, 2 * Ho + 2 - H)).contiguous(memory_format=torch.channels_last)
    Hp, Wp = xp.shape[2:]
    patches = xp.as_strided((B, Ho, Wo, 7, 7, C), (Hp * Wp * C, 2 * Wp * C, 2 * C, Wp * C, C, 1))
    return patches.reshape(B * Ho * Wo, 7 * 7 * C)


class _GemmGradStemConv(torch.autograd.Function):
    """Conv 7x7/2 (padding 3) whose weight gradient is one GEMM over the input patches.

    On CPU, oneDNN's weight-gradient kernel for a single input channel (the cluttered-MNIST stem)
    takes ~75 ms per batch of 64 1x100x100 canvases; patches + GEMM take ~25 ms. The input gets no
    gradient (the stem's input is the image). Output (B, C_out, Ho, Wo) in channels-last memory.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, stride=2, padding=3).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        c_out, out_hw = weight.shape[0], grad.shape[2:]
        grad = grad.permute(0, 2, 3, 1).reshape(-1, c_out)  # (B * Ho * Wo, C_out), a view when channels-last
        patches = _stem_patches(x, out_hw)
        grad_w = (grad.t() @ patches).view(c_out, 7, 7, x.shape[1]).permute(0, 3, 1, 2)
        # copied into the weight's exact strides: DDP's buckets compare every stride, and with one input
        # channel the permuted view already counts as contiguous (.contiguous() would keep its strides)
        return None, torch.empty_like(weight).copy_(grad_w), grad.sum(0)


class EarlyConvolution(nn.Module):
    """Conv 7x7/2 -> ReLU -> MaxPool 3/2 -> parameter-free channel standardisation.

    x (B, in_chans, H, W) -> feature map (B, H/4, W/4, C), channels-last and contiguous, in fp32
    when the conv ran in fp16 (the authors promote it, `_maybe_promote`), else the conv's dtype.
    """

    def __init__(self, in_chans: int = 3, conv_dim: int = 96):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, conv_dim, kernel_size=7, stride=2, padding=3, bias=True)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def gemm_weight_grad(self, x: Tensor) -> bool:
        """Train a 1-channel stem on CPU through `_GemmGradStemConv` (same result, ~2x faster stem step)."""
        conv = self.conv1
        return (
            x.device.type == "cpu" and x.shape[1] == 1 and not x.requires_grad and torch.is_grad_enabled()
            and conv.weight.requires_grad and conv.bias is not None and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, x: Tensor) -> Tensor:
        # Channels-last throughout: pooling and the per-pixel standardisation then run on contiguous
        # C-vectors (~2.5x faster stem on CPU than NCHW) and the output needs no permute copy.
        # (the output is forced channels-last too: with one input channel both layouts look contiguous
        # and oneDNN returns NCHW, whose max-pool is ~10x slower on CPU)
        conv = self.conv1
        if self.gemm_weight_grad(x):
            x = _GemmGradStemConv.apply(x, conv.weight, conv.bias)
        else:
            x = conv(x.contiguous(memory_format=torch.channels_last)).contiguous(memory_format=torch.channels_last)
        # relu(maxpool(x)) == maxpool(relu(x)) (max commutes with a monotone map; same argmax, same
        # gradients): ReLU on the 4x smaller pooled map, in place.
        x = F.relu(self.pool(x), inplace=True).permute(0, 2, 3, 1)  # (B, h, w, C) view, contiguous
        out_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # (x - mean) / sqrt(var_unbiased + 1e-7) over channels (MODEL.md, "Early convolution"), as one
        # layer_norm: with var_u = var * C / (C - 1) it equals sqrt((C-1)/C) * (x - mean) / sqrt(var + 1e-7 (C-1)/C).
        C = x.shape[-1]
        scale = x.new_full((C,), math.sqrt((C - 1) / C))
        x = F.layer_norm(x.contiguous(), (C,), scale, None, STD_EPS * (C - 1) / C)
        return x.to(out_dtype)


# ----------------------------------------------------------------------------- RoI geometry
def adjust_rois(rois: Tensor, delta: Tensor) -> Tensor:
    """RoI adjustment (MODEL.md step 2), in fp32, for boxes (D = 2) or tubes (D = 3).

    rois (B, N, 2D) as (x1, y1[, t1], x2, y2[, t2]); delta (B, N, 2D) as (dx, dy[, dt], dw, dh[, dl])
    -> centre += shifts * sizes; sizes *= exp(log-scales); re-encoded the same way. No clamping.
    """
    rois, delta = at_least_fp32(rois), at_least_fp32(delta)
    D = rois.shape[-1] // 2
    centre = (rois[..., D:] + rois[..., :D]) * 0.5
    size = (rois[..., D:] - rois[..., :D]).abs()
    centre = centre + delta[..., :D] * size
    size = size * delta[..., D:].exp()
    return torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)


def make_sampling_points(rois: Tensor, offsets: Tensor) -> Tensor:
    """Sampling points (MODEL.md step 3), in fp32, for boxes (D = 2) or tubes (D = 3).

    rois (B, N, 2D); offsets (B, N, P, D) raw (x, y[, t]) offsets -> points (B, N, P, D) in
    normalised coordinates [0, 1]: the offsets standardised per token and axis over P,
    o_hat = (o - mean) / (3 * (std_unbiased + 1e-7)), then p = centre + o_hat * (hi - lo).
    """
    offsets = at_least_fp32(offsets)
    mean = offsets.mean(dim=2, keepdim=True)
    std = offsets.std(dim=2, keepdim=True) + STD_EPS
    offsets = (offsets - mean) / (3.0 * std)
    rois = at_least_fp32(rois)
    D = rois.shape[-1] // 2
    centre = (rois[..., D:] + rois[..., :D]) * 0.5
    size = rois[..., D:] - rois[..., :D]  # signed here, as in the authors' code
    return centre.unsqueeze(2) + offsets * size.unsqueeze(2)


def grid_init(n: int) -> Tensor:
    """(n, 2) centres (x, y) of a sqrt(n) x sqrt(n) grid over [0, 1], x varying fastest; rows
    beyond root^2 are left at 0.5 (the authors leave them at random values)."""
    root = int(math.isqrt(n))
    centres = (torch.arange(root, dtype=torch.float32) + 0.5) / root
    grid = torch.full((n, 2), 0.5)
    grid[: root * root, 0] = centres.repeat(root)
    grid[: root * root, 1] = centres.repeat_interleave(root)
    return grid


TIME_OFFSET_LEVELS = 2


def offset_bias_init(num_points: int, ndim: int = 2) -> Tensor:
    """(P, ndim) initial sampling-offset bias: the sqrt(P) x sqrt(P) grid centred on 0 (MODEL.md
    step 3), and for tubes a temporal offset cycling over TIME_OFFSET_LEVELS levels in [-0.5, 0.5]
    (point k at level k mod L), so the per-axis standardisation of the t offsets starts from a
    spread: with equal t offsets it divides by ~0 and its gradient is ~1/(3 eps) (docs/MODEL.md,
    "Video"). Two levels put every other point at t - d and t + d (d = a third of the tube's
    length after standardisation), so each token's spatial mix sees its content in time order."""
    bias = grid_init(num_points) - 0.5
    if ndim == 2:
        return bias
    levels = min(TIME_OFFSET_LEVELS, num_points)
    t = (torch.arange(num_points) % levels + 0.5) / levels - 0.5
    return torch.cat([bias, t[:, None]], dim=1)


# ----------------------------------------------------------------------------- adaptive mixing
class AdaptiveMixing(nn.Module):
    """Per-token dynamic channel and spatial mixing of the sampled features (MODEL.md step 5).

    A generator LN -> Linear(d, d/4) -> Linear(d/4, C*C + P*P) gives, per token, Mc (C_in, C_out)
    and Ms (P_out, P_in); the mixed (P, C) tile is flattened point-major and projected to d.
    """

    def __init__(self, dim: int, conv_dim: int, num_points: int):
        super().__init__()
        self.conv_dim, self.num_points = conv_dim, num_points
        self.parameter_generator = nn.Sequential(
            layer_norm(dim),
            nn.Linear(dim, dim // 4),
            nn.Linear(dim // 4, conv_dim * conv_dim + num_points * num_points),
        )
        self.m_beta = nn.Parameter(torch.zeros(conv_dim))
        self.s_beta = nn.Parameter(torch.zeros(num_points))
        self.out_proj = nn.Linear(num_points * conv_dim, dim)

    @torch.no_grad()
    def init_weights(self) -> None:
        C, P = self.conv_dim, self.num_points
        generator = self.parameter_generator
        generator[0].weight.fill_(generator[0].normalized_shape[0] ** -0.5)
        nn.init.zeros_(generator[2].weight)
        nn.init.xavier_uniform_(generator[2].bias[: C * C].view(C, C))
        nn.init.xavier_uniform_(generator[2].bias[C * C :].view(P, P))

    def forward(self, tokens: Tensor, fmap: FeatureMap, points: Tensor, fused: bool) -> Tensor:
        """tokens (B, N, d), points (B, N, P, 2|3) sampled from `fmap` -> (B, N, d).

        fused: sample and mix in one kernel (kernels.sample_and_mix), else sample then mix.
        """
        B, N, P, _ = points.shape
        params = self.parameter_generator(tokens)  # (B, N, C*C + P*P), whole, in the autocast dtype if any
        dtype = params.dtype
        beta_c, beta_s = self.m_beta.to(dtype), self.s_beta.to(dtype)
        if fused:
            mixed = fmap.sample_and_mix(points, params, beta_c, beta_s)
        else:
            mixed = adaptive_mix(fmap.sample(points).to(dtype), params, beta_c, beta_s, backend=fmap.backend)
        return self.out_proj(mixed.reshape(B, N, P * self.conv_dim))


# ----------------------------------------------------------------------------- blocks
class MultiheadSelfAttention(nn.Module):
    """Self-attention with `nn.MultiheadAttention`'s parameters (in_proj_weight/bias, out_proj),
    batch-first. x (B, N, d) -> (B, N, d)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, N, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d/heads)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, d))


class _GeluLinear(torch.autograd.Function):
    """Linear(GELU(h)) that keeps only h for backward and recomputes GELU(h) there: the FFN then
    saves one of its two 4d-wide activations (~3.8 MiB per image for SparseFormer-T; the extra
    element-wise GELU in backward is free next to the GEMMs). h (..., k) -> (..., n)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, weight = ctx.saved_tensors
        a = F.gelu(h)
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = (g2.t().to(weight.dtype) @ a.reshape(-1, a.shape[-1]).to(weight.dtype)
                  if ctx.needs_input_grad[1] else None)
        grad_b = g2.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_h = torch.ops.aten.gelu_backward(grad.matmul(weight.to(grad.dtype)).to(h.dtype), h)
        return grad_h, grad_w, grad_b


def feed_forward(ffn: nn.Sequential, x: Tensor) -> Tensor:
    """The FFN LN -> Linear -> GELU -> Linear of `ffn` (its parameters keep their names), with the
    last Linear through `_GeluLinear`. x (B, N, d) -> (B, N, d)."""
    norm, fc1, _, fc2 = ffn
    h = fc1(norm(x))
    if torch.is_autocast_enabled(h.device.type):  # the Function runs below autocast: cast like F.linear would
        dtype = torch.get_autocast_dtype(h.device.type)
        return _GeluLinear.apply(h.to(dtype), fc2.weight.to(dtype), fc2.bias.to(dtype))
    return _GeluLinear.apply(h, fc2.weight, fc2.bias)


class CortexBlock(nn.Module):
    """Pre-LN transformer block over the latent tokens: attention then FFN (MODEL.md steps 1, 6)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln_attn = layer_norm(dim)
        # The trained code builds nn.MultiheadAttention(d, 64 if d >= 64 else d) (MODEL.md step 1).
        self.attn = MultiheadSelfAttention(dim, min(num_heads, dim))
        self.ffn = nn.Sequential(
            layer_norm(dim), nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim)
        )

    def forward(self, tokens: Tensor, drop_prob: float) -> Tensor:
        tokens = tokens + drop_path(self.attn(self.ln_attn(tokens)), drop_prob, self.training)
        return tokens + drop_path(feed_forward(self.ffn, tokens), drop_prob, self.training)


class SamplingBlock(CortexBlock):
    """A block that also adjusts the RoIs, samples the feature map and mixes what it sampled:
    the focusing unit and cortex block 1 (MODEL.md steps 1-6, in that order). `ndim` 2 samples
    an image map with boxes, 3 a video volume with tubes (2 * ndim RoI deltas, ndim offsets per point)."""

    def __init__(self, dim: int, num_heads: int, conv_dim: int, num_points: int, mlp_ratio: int = 4, ndim: int = 2):
        super().__init__(dim, num_heads, mlp_ratio)
        self.num_points, self.ndim = num_points, ndim
        self.roi_adjust_module = nn.Sequential(layer_norm(dim), nn.Linear(dim, 2 * ndim, bias=False))
        self.roi_offset_module = nn.Sequential(layer_norm(dim), nn.Linear(dim, ndim * num_points, bias=False))
        self.roi_offset_bias = nn.Parameter(torch.zeros(ndim * num_points))
        self.adaptive_mixing = AdaptiveMixing(dim, conv_dim, num_points)

    @torch.no_grad()
    def init_weights(self) -> None:
        for head in (self.roi_adjust_module, self.roi_offset_module):
            head[0].weight.fill_(head[0].normalized_shape[0] ** -0.5)
        nn.init.zeros_(self.roi_adjust_module[1].weight)  # the offset Linear keeps std 0.02 (as trained)
        self.roi_offset_bias.copy_(offset_bias_init(self.num_points, self.ndim).flatten())
        self.adaptive_mixing.init_weights()

    def forward(self, tokens: Tensor, rois: Tensor, fmap: FeatureMap, drop_prob: float, fused: bool
                ) -> tuple[Tensor, Tensor, Tensor]:
        """tokens (B, N, d), rois (B, N, 2D), fmap of a (B, [T,] h, w, C) map -> tokens, rois, points (B, N, P, D)."""
        B, N, _ = tokens.shape
        tokens = tokens + drop_path(self.attn(self.ln_attn(tokens)), drop_prob, self.training)
        delta = drop_path(at_least_fp32(self.roi_adjust_module(tokens)), drop_prob, self.training)
        rois = adjust_rois(rois, delta)
        offsets = at_least_fp32(self.roi_offset_module(tokens)) + self.roi_offset_bias
        points = make_sampling_points(rois, offsets.view(B, N, self.num_points, self.ndim))
        mixed = self.adaptive_mixing(tokens, fmap, points, fused)
        tokens = tokens + drop_path(mixed, drop_prob, self.training)
        return tokens + drop_path(feed_forward(self.ffn, tokens), drop_prob, self.training), rois, points


class ClassifierHead(nn.Module):
    """Mean over tokens -> LayerNorm -> Linear. tokens (B, N, d) -> logits (B, classes)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = layer_norm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.classifier(self.norm(tokens.mean(dim=1)))


# ----------------------------------------------------------------------------- the model
@dataclass
class SparseFormerOutput:
    """logits (B, classes); embedding (B, N, d_c) final tokens after the head's LayerNorm;
    rois / points: one (B, N, 4) / (B, N, P, 2) entry per sampling step, in [0, 1] image coordinates."""

    logits: Tensor
    embedding: Tensor
    rois: list[Tensor] = field(default_factory=list)
    points: list[Tensor] = field(default_factory=list)


class SparseFormer(nn.Module):
    """Early convolution -> focusing transformer (one SamplingBlock applied `focusing_repeats` times,
    shared weights) -> transition -> cortex transformer (block 1 samples again) -> head.

    Subclasses change what is sampled (model/video.py: `ndim = 3`, a frame-wise stem, tubes)."""

    ndim = 2  # axes of the sampled map: 2 (image), 3 (video)

    def __init__(
        self,
        num_tokens: int = 49,
        num_points: int = 36,
        conv_dim: int = 96,
        focusing_dim: int = 256,
        cortex_dim: int = 512,
        cortex_depth: int = 8,
        focusing_repeats: int = 4,
        num_heads: int = 64,
        mlp_ratio: int = 4,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        backend: str = "auto",
        fused_sample_mix: bool | str = "auto",
        recompute_stem: bool | str = "auto",
        checkpoint_cortex: bool = False,
    ):
        super().__init__()
        self.init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        checks = {
            "num_tokens": num_tokens, "num_points": num_points, "conv_dim": conv_dim,
            "focusing_dim": focusing_dim, "cortex_dim": cortex_dim, "cortex_depth": cortex_depth,
            "focusing_repeats": focusing_repeats, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
            "num_classes": num_classes, "in_chans": in_chans,
        }  # fmt: skip
        for key, value in checks.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SparseFormer: {key} must be a positive integer, got {value!r}")
        if num_points < 2:
            raise ValueError(f"SparseFormer: num_points must be >= 2 (offsets are standardised over points), "
                             f"got {num_points}")
        for key, dim in (("focusing_dim", focusing_dim), ("cortex_dim", cortex_dim)):
            heads = min(num_heads, dim)
            if dim % heads or dim < 4:
                raise ValueError(f"SparseFormer: {key}={dim} must be >= 4 and divisible by num_heads={heads}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"SparseFormer: drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if backend not in BACKENDS:
            raise ValueError(f"SparseFormer: backend must be one of {BACKENDS}, got {backend!r}")
        for key, value in (("fused_sample_mix", fused_sample_mix), ("recompute_stem", recompute_stem)):
            if value != "auto" and not isinstance(value, bool):
                raise ValueError(f"SparseFormer: {key} must be 'auto', true or false, got {value!r}")
        if not isinstance(checkpoint_cortex, bool):
            raise ValueError(f"SparseFormer: checkpoint_cortex must be true or false, got {checkpoint_cortex!r}")
        self.num_tokens, self.num_points, self.in_chans = num_tokens, num_points, in_chans
        self.num_classes, self.focusing_repeats = num_classes, focusing_repeats
        self.backend = backend
        # "auto": sample and mix in one kernel where the Triton kernels run (kernels/fused.py); the
        # PyTorch reference of the fused op recomputes the sampling in backward, which only costs on CPU.
        self.fused_sample_mix = fused_sample_mix
        # Activation memory for compute (docs/BENCHMARKS.md, "Activation memory"): rerun the stem in
        # backward (it then keeps only the image; "auto": on the Triton path, where batches are large),
        # and/or the plain cortex blocks (they keep only their input).
        self.recompute_stem, self.checkpoint_cortex = recompute_stem, checkpoint_cortex
        # Multiplier of the sampling-gradient clamp +-(1/h_feat) * scale: the training loop sets it
        # to the AMP loss scale (the authors' RestrictGradNorm.GRAD_SCALE).
        self.sampling_grad_scale = 1.0

        self.stem = self.make_stem(in_chans, conv_dim)
        self.token_embedding = nn.Parameter(torch.empty(num_tokens, focusing_dim))
        self.token_roi = nn.Parameter(torch.empty(num_tokens, 2 * self.ndim))
        self.focusing = SamplingBlock(focusing_dim, num_heads, conv_dim, num_points, mlp_ratio, self.ndim)
        self.transition = (
            nn.Sequential(nn.Linear(focusing_dim, cortex_dim), layer_norm(cortex_dim))
            if focusing_dim != cortex_dim
            else nn.Identity()
        )
        self.cortex = nn.ModuleList(
            [SamplingBlock(cortex_dim, num_heads, conv_dim, num_points, mlp_ratio, self.ndim)]
            + [CortexBlock(cortex_dim, num_heads, mlp_ratio) for _ in range(cortex_depth - 1)]
        )
        self.head = ClassifierHead(cortex_dim, num_classes)
        # linspace(0, rate, repeats + depth): the focusing repeats take the first ones, each cortex block one.
        self.drop_path_rates = torch.linspace(0, drop_path_rate, focusing_repeats + cortex_depth, device="cpu").tolist()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """MODEL.md "Initialisation": Linear trunc-normal 0.02, LN (1, 0), then the special heads."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, MultiheadSelfAttention):
                nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)
        nn.init.kaiming_normal_(self.stem.conv1.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, SamplingBlock):
                m.init_weights()
        nn.init.trunc_normal_(self.token_embedding, std=1.0)
        self.token_roi.copy_(self.initial_rois(self.num_tokens))

    def initial_rois(self, n: int) -> Tensor:
        """(n, 4) boxes: a root x root grid of half-size boxes, token k at x-index k // root and
        y-index k % root; tokens beyond root^2 cover the whole image."""
        root = int(math.isqrt(n))
        rois = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1)
        u = torch.arange(root, dtype=torch.float32) / max(root - 1, 1)
        ux, uy = u.repeat_interleave(root), u.repeat(root)
        rois[: root * root] = torch.stack([0.5 * ux, 0.5 * uy, 0.5 * ux + 0.5, 0.5 * uy + 0.5], dim=1)
        return rois

    def no_weight_decay(self) -> set[str]:
        """Parameters that skip weight decay besides norms, biases and 1-D params (MODEL.md "Training recipe")."""
        return {"token_roi"}

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"SparseFormer expects images (B, {self.in_chans}, H, W), got {shape}")
        check_dtype(self, x, "clips" if getattr(self, "takes_clips", False) else "images")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"SparseFormer was built for {self.in_chans} input channels, got {x.shape[1]} "
                f"(shape {tuple(x.shape)}); set in_chans when creating the model"
            )
        if min(x.shape[2:]) < 8:
            raise ValueError(f"SparseFormer's stem needs images of at least 8x8 pixels, got {tuple(x.shape[2:])}")

    @staticmethod
    def make_stem(in_chans: int, conv_dim: int) -> nn.Module:
        return EarlyConvolution(in_chans, conv_dim)

    def point_grad_clamp(self, features: Tensor) -> float:
        """+-(1/h_feat) * scale on both axes (MODEL.md step 4; the authors clamp by the map's height)."""
        return self.sampling_grad_scale / features.shape[1]

    def fuses(self, fmap: FeatureMap) -> bool:
        """Whether the sampling steps run the fused sample+mix op."""
        return fmap.backend == "triton" if self.fused_sample_mix == "auto" else bool(self.fused_sample_mix)

    def early_convolution(self, x: Tensor) -> Tensor:
        """The stem, rerun in backward when `recompute_stem` (only the input is kept)."""
        again = self.recompute_stem
        if again == "auto":
            again = resolve_backend(self.backend, x.device) == "triton"
        if again and torch.is_grad_enabled():
            return recompute(self.stem, x, list(self.stem.parameters()), random=False)
        return self.stem(x)

    def forward(self, x: Tensor, return_aux: bool = False) -> Tensor | SparseFormerOutput:
        """x (B, in_chans, H, W) -> logits (B, classes), or SparseFormerOutput if `return_aux`."""
        self.check_input(x)
        features = self.early_convolution(x)  # (B, h, w, C)
        B = x.shape[0]
        tokens = self.token_embedding.unsqueeze(0).expand(B, -1, -1)
        rois = self.token_roi.unsqueeze(0).expand(B, -1, -1)
        # one FeatureMap for the 5 sampling steps: their map gradients go into one accumulator
        fmap = FeatureMap(features, point_grad_clamp=self.point_grad_clamp(features), backend=self.backend)
        fused = self.fuses(fmap)
        all_rois, all_points = [], []
        for i in range(self.focusing_repeats):
            tokens, rois, points = self.focusing(tokens, rois, fmap, self.drop_path_rates[i], fused)
            all_rois.append(rois)
            all_points.append(points)
        tokens = self.transition(tokens)
        for j, block in enumerate(self.cortex):
            rate = self.drop_path_rates[self.focusing_repeats + j]
            if isinstance(block, SamplingBlock):
                tokens, rois, points = block(tokens, rois, fmap, rate, fused)
                all_rois.append(rois)
                all_points.append(points)
            elif self.checkpoint_cortex and torch.is_grad_enabled():
                tokens = recompute(functools.partial(block, drop_prob=rate), tokens, list(block.parameters()),
                                   random=self.training and rate > 0)
            else:
                tokens = block(tokens, rate)
        logits = self.head(tokens)
        if not return_aux:
            return logits
        return SparseFormerOutput(logits, self.head.norm(tokens), all_rois, all_points)


# ----------------------------------------------------------------------------- named variants
# The released ImageNet-1K models (docs/MODEL.md "Variants"), plus a CPU-sized one for the embedded demo data.
VARIANTS: dict[str, dict] = {
    "sparseformer_t": dict(num_tokens=49, focusing_dim=256, cortex_dim=512, cortex_depth=8, drop_path_rate=0.2),
    "sparseformer_s": dict(num_tokens=64, focusing_dim=320, cortex_dim=640, cortex_depth=8, drop_path_rate=0.3),
    "sparseformer_b": dict(num_tokens=81, focusing_dim=384, cortex_dim=768, cortex_depth=10, drop_path_rate=0.4),
    # Sized for 1x100x100 cluttered-MNIST canvases on a 2-core CPU (tuning notes: docs/MODEL.md,
    # "sparseformer_nano and the CPU demo").
    "sparseformer_nano": dict(
        num_tokens=25, num_points=16, conv_dim=32, focusing_dim=64, cortex_dim=128, cortex_depth=2,
        num_heads=8, drop_path_rate=0.0,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------- checkpoint conversion
# Two released layouts (docs/MODEL.md, "Checkpoint layouts"); the layout is detected from the keys.
# v1 (release v1.0.0-imagenet, the authors' imagenet/ code): feat_extractor.conv1, token_roi.weight /
# token_embedding.weight (nn.Embedding; initial_roi / initial_embedding in the public repo), layers.0 =
# focusing unit, layers.1 = transition (absent when the two widths are equal), then the cortex blocks,
# head.{norm, classifier}; the mixing projection is `tuo_proj` in the released files (`out_proj` in the repo).
# v2 (release v2.0.0-refactor, the authors' library): v1 renamed per block (below) and at the top
# (initial_roi, initial_embedding, norm, proj), mixing zero-padded to 32 output points below 32 points.
RELEASES = "https://github.com/showlab/sparseformer/releases/download"
# variant -> {release tag: URL}; `pretrained=True` takes the first: the library-layout file that the
# authors' own create_model(download=True) fetches.
RELEASED_WEIGHTS: dict[str, dict[str, str]] = {
    f"sparseformer_{v}": {
        "v2.0.0-refactor": f"{RELEASES}/v2.0.0-refactor/sparseformer_v1_{size}_converted.pth",
        "v1.0.0-imagenet": f"{RELEASES}/v1.0.0-imagenet/sparseformer_{v}_imagenet1k.pth",
    }
    for v, size in (("t", "tiny"), ("s", "small"), ("b", "base"))
}
_V2_BLOCK = (("ln_attn.", "norm1."), ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
             ("attn.out_proj.", "attn.proj."), ("ffn.0.", "norm2."), ("ffn.1.", "mlp.fc1."), ("ffn.3.", "mlp.fc2."),
             ("adaptive_mixing.tuo_proj.", "adaptive_mixing.out_proj."))  # (v1, v2) after `layers.N.`
_V2_TOP = (("token_roi.weight", "initial_roi.weight"), ("token_embedding.weight", "initial_embedding.weight"),
           ("head.norm.", "norm."), ("head.classifier.", "proj."))  # (v1, v2)


def detect_layout(state: dict) -> str:
    """"ours", "v1" or "v2" from the keys of a state dict."""
    if "stem.conv1.weight" in state:
        return "ours"
    if "feat_extractor.conv1.weight" not in state:
        raise ValueError(f"not a SparseFormer state dict: no stem weights (keys: {sorted(state)[:8]} ...)")
    v2 = ("norm.weight" in state or "proj.weight" in state or any(k.endswith(".attn.qkv.weight") for k in state))
    return "v2" if v2 else "v1"


def _rename(key: str, pairs, src: int) -> str:
    for pair in pairs:
        if key.startswith(pair[src]):
            return pair[1 - src] + key[len(pair[src]) :]
    return key


def v2_to_v1_state_dict(state: dict) -> dict:
    """The authors' library layout -> their v1 layout: the renames undone, and the mixing's zero padding
    to 32 output points (P < 32) sliced back to P (it must be exactly zero: P-point mixing cannot hold more)."""
    out = {}
    for key, value in state.items():
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            out[f"layers.{index}.{_rename(rest, _V2_BLOCK, 1)}"] = value
        else:
            out[_rename(key, _V2_TOP, 1)] = value
    for prefix in sorted({k[: -len("roi_offset_bias")] for k in out if k.endswith(".roi_offset_bias")}):
        mixing = prefix + "adaptive_mixing."
        P, C = out[prefix + "roi_offset_bias"].numel() // 2, out[mixing + "m_beta"].numel()
        keep = {mixing + "s_beta": (slice(P),), mixing + "parameter_generator.2.weight": (slice(C * C + P * P),),
                mixing + "parameter_generator.2.bias": (slice(C * C + P * P),),
                mixing + "tuo_proj.weight": (slice(None), slice(P * C))}
        for key, index in keep.items():
            full, kept = out[key], out[key][index]
            if kept.shape != full.shape:
                if full.count_nonzero() != kept.count_nonzero():
                    raise ValueError(f"{key} {tuple(full.shape)}: mixing padded beyond {P} points with non-zero "
                                     f"values; a {P}-point SparseFormer cannot hold it")
                out[key] = kept
    return out


def _official_layout(state: dict) -> tuple[bool, int]:
    """(has_transition, index of the first cortex layer) in the authors' `layers.*` numbering."""
    has_transition = "layers.1.0.weight" in state and state["layers.1.0.weight"].dim() == 2
    return has_transition, 2 if has_transition else 1


def config_from_official(config: dict) -> dict:
    """The authors' SparseFormer(...) constructor arguments -> our SparseFormer keyword arguments."""
    known = {"conv_dim", "num_latent_tokens", "token_sampling_points", "width_configurations", "block_sizes",
             "repeats", "drop_path_rate", "num_classes", "num_heads", "in_chans"}  # fmt: skip
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"unknown keys in the authors' config: {sorted(unknown)}; known: {sorted(known)}")
    widths = config.get("width_configurations", [256, 512])
    blocks = config.get("block_sizes", [1, 8])
    repeats = config.get("repeats", [4, 1])
    if len(widths) != 2 or len(blocks) != 2 or blocks[0] != 1 or repeats[1:] != [1]:
        raise ValueError(
            "only the v1 layout (one focusing unit repeated, then cortex blocks) is supported: "
            f"width_configurations={widths}, block_sizes={blocks}, repeats={repeats}"
        )
    out = dict(
        conv_dim=config.get("conv_dim", 96),
        num_tokens=config.get("num_latent_tokens", 49),
        num_points=config.get("token_sampling_points", 36),
        focusing_dim=widths[0],
        cortex_dim=widths[1],
        cortex_depth=blocks[1],
        focusing_repeats=repeats[0],
        drop_path_rate=config.get("drop_path_rate", 0.0),
    )
    out.update({k: config[k] for k in ("num_classes", "num_heads", "in_chans") if k in config})
    return out


def infer_config(state: dict) -> dict:
    """Our keyword arguments from the shapes of an authors' v1 state dict (heads and focusing
    repeats are not visible in shapes: the v1 values 64 and 4 are used)."""
    _, first = _official_layout(state)
    try:
        roi = state.get("token_roi.weight", state.get("initial_roi.weight"))
        emb = state.get("token_embedding.weight", state.get("initial_embedding.weight"))
        depth = len({k.split(".")[1] for k in state if k.startswith("layers.") and int(k.split(".")[1]) >= first})
        return dict(
            num_tokens=roi.shape[0],
            num_points=state["layers.0.roi_offset_bias"].shape[0] // 2,
            conv_dim=state["feat_extractor.conv1.weight"].shape[0],
            in_chans=state["feat_extractor.conv1.weight"].shape[1],
            focusing_dim=emb.shape[1],
            cortex_dim=state["head.norm.weight"].shape[0],
            cortex_depth=depth,
            num_classes=state["head.classifier.weight"].shape[0],
        )
    except (KeyError, AttributeError) as err:
        raise ValueError(f"cannot infer the SparseFormer variant: this is not an authors' v1 state dict ({err!r})") \
            from None


def _official_to_ours_key(key: str, first_cortex: int) -> str | None:
    renames = {
        "feat_extractor.conv1.": "stem.conv1.",
        "token_roi.weight": "token_roi",
        "initial_roi.weight": "token_roi",
        "token_embedding.weight": "token_embedding",
        "initial_embedding.weight": "token_embedding",
        "head.": "head.",
    }
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if not key.startswith("layers."):
        return None
    _, index, rest = key.split(".", 2)
    index = int(index)
    rest = rest.replace("adaptive_mixing.tuo_proj.", "adaptive_mixing.out_proj.")
    if index == 0:
        return f"focusing.{rest}"
    if index < first_cortex:
        return f"transition.{rest}"
    return f"cortex.{index - first_cortex}.{rest}"


def checkpoint_filter_fn(state: dict, model: SparseFormer | None = None) -> dict:
    """Any of our three layouts (ours, the authors' v1, v2) -> ours, renamed only (no shape checks).
    A key that has no place in ours keeps its name, so the check that follows lists it."""
    layout = detect_layout(state)
    if layout == "ours":
        return dict(state)
    state = v2_to_v1_state_dict(state) if layout == "v2" else state
    _, first = _official_layout(state)
    ours = model.state_dict() if model is not None else None
    out = {}
    for key, value in state.items():
        new = _official_to_ours_key(key, first)
        out[new if new is not None and (ours is None or new in ours) else key] = value
    return out


def convert_official_state_dict(state: dict, model: SparseFormer) -> dict:
    """Authors' v1 or v2 state dict -> ours for `model`; raises listing every key it cannot place or misses."""
    converted = checkpoint_filter_fn(state, model)
    check_state_dict(converted, model, "official checkpoint")
    return converted


def export_official_state_dict(model: SparseFormer) -> dict:
    """Our weights in the authors' released v1 layout (inverse of `convert_official_state_dict`)."""
    first = 2 if isinstance(model.transition, nn.Sequential) else 1
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("stem.conv1."):
            new = "feat_extractor." + key[len("stem.") :]
        elif key in ("token_roi", "token_embedding"):
            new = key + ".weight"
        elif key.startswith("focusing."):
            new = "layers.0." + key[len("focusing.") :]
        elif key.startswith("transition."):
            new = "layers.1." + key[len("transition.") :]
        elif key.startswith("cortex."):
            _, index, rest = key.split(".", 2)
            new = f"layers.{int(index) + first}.{rest}"
        else:
            new = key
        out[new.replace("adaptive_mixing.out_proj.", "adaptive_mixing.tuo_proj.")] = value
    return out


def load_official_checkpoint(
    path_or_state_dict, config=None, *, use_ema: bool = False, **overrides
) -> SparseFormer:
    """Our SparseFormer holding the authors' released weights, v1 or v2 layout (detected).

    Args:
        path_or_state_dict: a checkpoint file, or a state dict; bare or wrapped under
            `model` / `model_ema` / `state_dict` (a `module.` prefix is stripped).
        config: None (infer the variant from shapes, or use an authors' config stored in the file),
            a variant name (e.g. "sparseformer_t"), our keyword arguments, or the authors'
            constructor arguments (`num_latent_tokens`, `width_configurations`, ...).
        use_ema: prefer the `model_ema` weights when the file has both.
        overrides: extra keyword arguments for the model (e.g. backend, drop_path_rate).
    """
    obj = path_or_state_dict
    source = "state dict" if isinstance(obj, dict) else str(obj)
    if not isinstance(obj, dict):
        obj = read_checkpoint(obj)
    if is_train_checkpoint(obj):
        return _load_train_checkpoint(obj, use_ema, overrides)  # our own train.py checkpoint: just load it
    state, stored_config = find_state_dict(obj, use_ema)
    try:
        return _load_official_state(state, stored_config, config, overrides)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _load_train_checkpoint(obj: dict, use_ema: bool, overrides: dict) -> nn.Module:
    """The model of a train.py checkpoint, built from the config stored in it (training/checkpoint.py)."""
    from .factory import create_model

    cfg = {k: v for k, v in obj["config"].get("model", {}).items()
           if k not in ("_target_", "pretrained", "pretrained_ema")}
    model = create_model(**cfg, **overrides)
    model.load_state_dict(find_state_dict(obj, use_ema)[0])  # its `ema` weights with use_ema, where it has them
    return model


def _load_official_state(state: dict, stored_config, config, overrides: dict) -> SparseFormer:
    config = stored_config if config is None else config
    if isinstance(config, str) and config not in VARIANTS:
        raise ValueError(f"unknown SparseFormer variant {config!r}; known: {sorted(VARIANTS)}")
    if detect_layout(state) == "ours":  # a bare state dict of this repo's models holds no architecture
        roi = state.get("token_roi")
        kind = ("videosparseformer" if roi is not None and roi.shape[-1] == 6 else "sparseformer") + "_<t|s|b|nano>"
        raise ValueError(f"a bare state dict of this repo's own layout (not the authors', not a train.py checkpoint): "
                         f"it does not say which model it is; load it with model.create_model('{kind}', "
                         "pretrained=<file>) and the overrides it was built with")
    if detect_layout(state) == "v2":
        state = v2_to_v1_state_dict(state)
    if config is None:
        kwargs = infer_config(state)
        widths = {k: kwargs[k] for k in ("num_tokens", "focusing_dim", "cortex_dim", "cortex_depth")}
        released = any(all(VARIANTS[v][k] == w for k, w in widths.items()) for v in RELEASED_WEIGHTS)
        if not released and not {"num_heads", "focusing_repeats"} <= set(overrides):
            log.warning("these weights' widths %s match no released SparseFormer; the head count and focusing "
                        "repeats are not in the weights and are taken as the releases' 64 and 4: pass num_heads= "
                        "and focusing_repeats= if the weights were trained otherwise", widths)
    elif isinstance(config, str):
        kwargs = {**VARIANTS[config], "drop_path_rate": 0.0}
    elif {"num_latent_tokens", "width_configurations", "block_sizes"} & set(config):
        kwargs = config_from_official(dict(config))
    else:
        kwargs = dict(config)
    if config is not None:  # classes / channels are always visible in the weights
        inferred = infer_config(state)
        kwargs = {"num_classes": inferred["num_classes"], "in_chans": inferred["in_chans"], **kwargs}
    model = SparseFormer(**{**kwargs, **overrides})
    model.load_state_dict(convert_official_state_dict(state, model))
    return model
