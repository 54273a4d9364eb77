"""Sparse feature sampling: bilinear gather of a channels-last map at per-token points.

Semantics (SPEC.md, "One sampling unit", step 4) are those of
`F.grid_sample(map, 2 * points - 1, mode="bilinear", padding_mode="zeros", align_corners=False)`:
coordinates are normalised to [0, 1] with 0 and 1 on the outer edges of the map, points
outside read zeros. The gradient w.r.t. the points can be clamped element-wise
(the authors' `RestrictGradNorm`, applied on these [0, 1] coordinates).

Layout of this module: reference -> host wrappers -> torch.library ops (+ FLOP formula,
autograd) -> public function.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .backend import check_inputs, check_same_dtype, resolve_backend


# ----------------------------------------------------------------------------- reference
def sparse_sample_reference(features: Tensor, points: Tensor) -> Tensor:
    """Pure-PyTorch sampling (no clamp).

    features (B, H, W, C), points (B, N, P, 2) as (x, y) in [0, 1] -> (B, N, P, C).
    fp16/bf16 maps are sampled in fp32 (the authors promote the map to fp32 before
    sampling) and the result is cast back to the map's dtype; fp64 stays fp64.
    """
    compute = torch.promote_types(features.dtype, torch.float32)
    fmap = features.to(compute).permute(0, 3, 1, 2)  # (B, C, H, W), a view of channels-last memory
    grid = points.to(compute) * 2.0 - 1.0  # grid_sample's [-1, 1] convention
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, N, P)
    return out.permute(0, 2, 3, 1).to(features.dtype)


def sparse_sample_reference_backward(grad_out: Tensor, features: Tensor, points: Tensor):
    """Gradients of `sparse_sample_reference` w.r.t. (features, points), unclamped.

    grad_out (B, N, P, C) -> ((B, H, W, C), (B, N, P, 2)). Uses ATen's grid_sample backward
    (custom-op bodies run below autograd, so this is explicit rather than `autograd.grad`).
    """
    compute = torch.promote_types(features.dtype, torch.float32)
    fmap = features.to(compute).permute(0, 3, 1, 2)
    grid = points.to(compute) * 2.0 - 1.0
    grad = grad_out.to(compute).permute(0, 3, 1, 2)  # (B, C, N, P)
    grad_fmap, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
        grad, fmap, grid, 0, 0, False, [True, True]  # bilinear, zeros, align_corners=False
    )
    grad_f = grad_fmap.permute(0, 2, 3, 1).to(features.dtype)
    grad_p = (grad_grid * 2.0).to(points.dtype)  # d(2p - 1)/dp = 2
    return grad_f, grad_p


# ----------------------------------------------------------------------------- host wrappers
def sparse_sample_fwd(features: Tensor, points: Tensor, backend: str) -> Tensor:
    if backend == "triton":
        raise NotImplementedError("the Triton sampling kernel is not implemented yet; use backend='torch'")
    return sparse_sample_reference(features, points)


def sparse_sample_bwd(grad_out: Tensor, features: Tensor, points: Tensor, clamp: Optional[float], backend: str):
    if backend == "triton":
        raise NotImplementedError("the Triton sampling kernel is not implemented yet; use backend='torch'")
    grad_f, grad_p = sparse_sample_reference_backward(grad_out, features, points)
    if clamp is not None:
        grad_p = grad_p.clamp(-clamp, clamp)
    return grad_f, grad_p


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("sparseformer::sparse_sample", mutates_args=())
def _sparse_sample_op(features: Tensor, points: Tensor, clamp: Optional[float], backend: str) -> Tensor:
    return sparse_sample_fwd(features, points, backend)


@_sparse_sample_op.register_fake
def _(features, points, clamp, backend):
    return features.new_empty(points.shape[0], points.shape[1], points.shape[2], features.shape[3])


@torch.library.custom_op("sparseformer::sparse_sample_backward", mutates_args=())
def _sparse_sample_backward_op(
    grad_out: Tensor, features: Tensor, points: Tensor, clamp: Optional[float], backend: str
) -> tuple[Tensor, Tensor]:
    return sparse_sample_bwd(grad_out, features, points, clamp, backend)


@_sparse_sample_backward_op.register_fake
def _(grad_out, features, points, clamp, backend):
    return torch.empty_like(features), torch.empty_like(points)


def _setup_context(ctx, inputs, output):
    features, points, clamp, backend = inputs
    ctx.save_for_backward(features, points)
    ctx.clamp, ctx.backend = clamp, backend


def _backward(ctx, grad_out):
    features, points = ctx.saved_tensors
    grad_f, grad_p = _sparse_sample_backward_op(grad_out.contiguous(), features, points, ctx.clamp, ctx.backend)
    return grad_f, grad_p, None, None


_sparse_sample_op.register_autograd(_backward, setup_context=_setup_context)


# Bilinear interpolation is 4 multiply-adds per output element (fvcore's grid_sampler convention);
# FlopCounterMode counts FLOPs = 2 x MACs.
@register_flop_formula(torch.ops.sparseformer.sparse_sample)
def _sparse_sample_flops(features_shape, points_shape, *args, out_shape=None, **kwargs) -> int:
    B, N, P, _ = points_shape
    return 2 * 4 * B * N * P * features_shape[3]


@register_flop_formula(torch.ops.sparseformer.sparse_sample_backward)
def _sparse_sample_backward_flops(grad_shape, features_shape, points_shape, *args, out_shape=None, **kwargs) -> int:
    B, N, P, C = grad_shape
    return 2 * 2 * 4 * B * N * P * C  # grad of the map (scatter) + grad of the points (reduction over C)


# ----------------------------------------------------------------------------- public function
def sparse_sample(
    features: Tensor, points: Tensor, *, point_grad_clamp: Optional[float] = None, backend: str = "auto"
) -> Tensor:
    """Bilinearly sample `features` at `points`.

    Args:
        features: (B, H, W, C) channels-last feature map.
        points: (B, N, P, 2) sampling points as normalised (x, y) in [0, 1]; 0 and 1 are the
            outer edges of the map (`align_corners=False`), points outside read zeros.
        point_grad_clamp: if a number, the gradient w.r.t. `points` is clamped element-wise
            to +-that value in backward.
        backend: "auto" (Triton on CUDA, reference otherwise), "triton" or "torch".
    Returns:
        (B, N, P, C) in the dtype of `features`.
    """
    check_inputs("sparse_sample", features=features, points=points)
    if features.dim() != 4:
        raise ValueError(f"sparse_sample: features must be (B, H, W, C), got shape {tuple(features.shape)}")
    if points.dim() != 4 or points.shape[-1] != 2:
        raise ValueError(f"sparse_sample: points must be (B, N, P, 2), got shape {tuple(points.shape)}")
    if points.shape[0] != features.shape[0]:
        raise ValueError(
            f"sparse_sample: batch of points ({points.shape[0]}) != batch of features ({features.shape[0]})"
        )
    if features.dtype == torch.float64 or points.dtype == torch.float64:
        check_same_dtype("sparse_sample", features=features, points=points)
    if point_grad_clamp is not None:
        point_grad_clamp = float(point_grad_clamp)
        if not point_grad_clamp > 0:
            raise ValueError(f"sparse_sample: point_grad_clamp must be positive, got {point_grad_clamp}")
    return _sparse_sample_op(features, points, point_grad_clamp, resolve_backend(backend, features.device))
