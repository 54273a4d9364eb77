"""Sparse feature sampling: bilinear gather of a channels-last map at per-token points.

Semantics (SPEC.md, "One sampling unit", step 4) are those of
`F.grid_sample(map, 2 * points - 1, mode="bilinear", padding_mode="zeros", align_corners=False)`:
coordinates are normalised to [0, 1] with 0 and 1 on the outer edges of the map, points
outside read zeros. The gradient w.r.t. the points can be clamped element-wise
(the authors' `RestrictGradNorm`, applied on these [0, 1] coordinates).

Layout of this module: reference -> Triton kernels -> host wrappers -> torch.library ops
(+ FLOP formula, autograd) -> public function.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import backend as _backend
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


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _corners(p_x, p_y, m_q, H, W, COMPUTE: tl.constexpr):
    """Bilinear corners and weights of points (x, y) in [0, 1] (grid_sample, align_corners=False).

    The source index follows ATen's CUDA `((g + 1) * size - 1) / 2` with g = 2p - 1 (its CPU path
    computes `g * size / 2 + (size / 2 - 0.5)`: equal, up to rounding, which only matters at
    corner switches, where the point gradient jumps).
    """
    b_px = tl.load(p_x, mask=m_q, other=0).to(COMPUTE)
    b_py = tl.load(p_y, mask=m_q, other=0).to(COMPUTE)
    b_ix = ((b_px * 2 - 1 + 1) * W - 1) * 0.5
    b_iy = ((b_py * 2 - 1 + 1) * H - 1) * 0.5
    # far-away points would overflow the int cast; [-2, size + 1] keeps every corner of them outside
    b_ix = tl.minimum(tl.maximum(b_ix, -2.0), W + 1.0)
    b_iy = tl.minimum(tl.maximum(b_iy, -2.0), H + 1.0)
    # tl.floor, not an int cast: casts truncate toward zero and pick the wrong corner left of / above the map
    b_x0 = tl.floor(b_ix)
    b_y0 = tl.floor(b_iy)
    b_wx1 = b_ix - b_x0
    b_wy1 = b_iy - b_y0
    i_x0 = b_x0.to(tl.int32)
    i_y0 = b_y0.to(tl.int32)
    return i_x0, i_y0, 1 - b_wx1, b_wx1, 1 - b_wy1, b_wy1


@triton.jit
def _corner_offsets(i_y, i_x, m_q, H, W, s_h, s_w):
    """Offsets of one corner in a (H, W, *) map and whether it lies inside (zeros padding)."""
    m = m_q & (i_x >= 0) & (i_x < W) & (i_y >= 0) & (i_y < H)
    return i_y.to(tl.int64) * s_h + i_x.to(tl.int64) * s_w, m


@triton.jit
def sparse_sample_fwd_kernel(
    p_f, p_pt, p_o,
    H, W, C, N, P, NUM_Q_BLOCKS,
    s_fb, s_fh, s_fw, s_fc,
    s_pb, s_pn, s_pp, s_pxy,
    COMPUTE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program per (batch, block of BLOCK_Q flattened (n, p) points), looping over C.

    features (B, H, W, C) strided, points (B, N, P, 2) strided -> out (B, N, P, C) contiguous.
    """
    i_pid = tl.program_id(0).to(tl.int64)
    i_b = i_pid // NUM_Q_BLOCKS
    o_q = (i_pid % NUM_Q_BLOCKS) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_q = o_q < N * P
    p_xy = p_pt + i_b * s_pb + (o_q // P) * s_pn + (o_q % P) * s_pp
    i_x0, i_y0, b_wx0, b_wx1, b_wy0, b_wy1 = _corners(p_xy, p_xy + s_pxy, m_q, H, W, COMPUTE)
    o_00, m_00 = _corner_offsets(i_y0, i_x0, m_q, H, W, s_fh, s_fw)
    o_01, m_01 = _corner_offsets(i_y0, i_x0 + 1, m_q, H, W, s_fh, s_fw)
    o_10, m_10 = _corner_offsets(i_y0 + 1, i_x0, m_q, H, W, s_fh, s_fw)
    o_11, m_11 = _corner_offsets(i_y0 + 1, i_x0 + 1, m_q, H, W, s_fh, s_fw)
    b_w00 = (b_wy0 * b_wx0)[:, None]
    b_w01 = (b_wy0 * b_wx1)[:, None]
    b_w10 = (b_wy1 * b_wx0)[:, None]
    b_w11 = (b_wy1 * b_wx1)[:, None]
    p_fb = p_f + i_b * s_fb
    p_ob = p_o + (i_b * N * P + o_q)[:, None] * C
    for i_c in range(0, C, BLOCK_C):
        o_c = i_c + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        p_fc = p_fb + (o_c * s_fc)[None, :]
        b_o = b_w00 * tl.load(p_fc + o_00[:, None], mask=m_00[:, None] & m_c[None, :], other=0).to(COMPUTE)
        b_o += b_w01 * tl.load(p_fc + o_01[:, None], mask=m_01[:, None] & m_c[None, :], other=0).to(COMPUTE)
        b_o += b_w10 * tl.load(p_fc + o_10[:, None], mask=m_10[:, None] & m_c[None, :], other=0).to(COMPUTE)
        b_o += b_w11 * tl.load(p_fc + o_11[:, None], mask=m_11[:, None] & m_c[None, :], other=0).to(COMPUTE)
        tl.store(p_ob + o_c[None, :], b_o.to(p_o.dtype.element_ty), mask=m_q[:, None] & m_c[None, :])


@triton.jit
def sparse_sample_bwd_kernel(
    p_do, p_f, p_pt, p_df, p_dpt,
    H, W, C, N, P, NUM_Q_BLOCKS, clamp,
    s_gb, s_gn, s_gp, s_gc,
    s_fb, s_fh, s_fw, s_fc,
    s_pb, s_pn, s_pp, s_pxy,
    HAS_CLAMP: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Same grid as the forward. grad of the map: scatter-add into a contiguous (B, H, W, C)
    fp32 (fp64 for fp64 inputs) buffer; grad of the points: reduction over C in the program,
    then the optional element-wise clamp, stored into a contiguous (B, N, P, 2) buffer.
    """
    i_pid = tl.program_id(0).to(tl.int64)
    i_b = i_pid // NUM_Q_BLOCKS
    o_q = (i_pid % NUM_Q_BLOCKS) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_q = o_q < N * P
    o_n = o_q // P
    o_p = o_q % P
    p_xy = p_pt + i_b * s_pb + o_n * s_pn + o_p * s_pp
    i_x0, i_y0, b_wx0, b_wx1, b_wy0, b_wy1 = _corners(p_xy, p_xy + s_pxy, m_q, H, W, COMPUTE)
    o_00, m_00 = _corner_offsets(i_y0, i_x0, m_q, H, W, s_fh, s_fw)
    o_01, m_01 = _corner_offsets(i_y0, i_x0 + 1, m_q, H, W, s_fh, s_fw)
    o_10, m_10 = _corner_offsets(i_y0 + 1, i_x0, m_q, H, W, s_fh, s_fw)
    o_11, m_11 = _corner_offsets(i_y0 + 1, i_x0 + 1, m_q, H, W, s_fh, s_fw)
    # the gradient buffer is contiguous (B, H, W, C)
    d_00, _ = _corner_offsets(i_y0, i_x0, m_q, H, W, W * C, C)
    d_01, _ = _corner_offsets(i_y0, i_x0 + 1, m_q, H, W, W * C, C)
    d_10, _ = _corner_offsets(i_y0 + 1, i_x0, m_q, H, W, W * C, C)
    d_11, _ = _corner_offsets(i_y0 + 1, i_x0 + 1, m_q, H, W, W * C, C)
    b_wx0c, b_wx1c = b_wx0[:, None], b_wx1[:, None]
    b_wy0c, b_wy1c = b_wy0[:, None], b_wy1[:, None]
    p_fb = p_f + i_b * s_fb
    p_dfb = p_df + i_b * H * W * C
    p_gb = p_do + i_b * s_gb + (o_n * s_gn + o_p * s_gp)[:, None]
    b_dx = tl.zeros([BLOCK_Q], dtype=COMPUTE)
    b_dy = tl.zeros([BLOCK_Q], dtype=COMPUTE)
    for i_c in range(0, C, BLOCK_C):
        o_c = i_c + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        m_qc = m_q[:, None] & m_c[None, :]
        b_g = tl.load(p_gb + (o_c * s_gc)[None, :], mask=m_qc, other=0).to(COMPUTE)
        p_fc = p_fb + (o_c * s_fc)[None, :]
        m_00c = m_00[:, None] & m_c[None, :]
        m_01c = m_01[:, None] & m_c[None, :]
        m_10c = m_10[:, None] & m_c[None, :]
        m_11c = m_11[:, None] & m_c[None, :]
        b_v00 = tl.load(p_fc + o_00[:, None], mask=m_00c, other=0).to(COMPUTE)
        b_v01 = tl.load(p_fc + o_01[:, None], mask=m_01c, other=0).to(COMPUTE)
        b_v10 = tl.load(p_fc + o_10[:, None], mask=m_10c, other=0).to(COMPUTE)
        b_v11 = tl.load(p_fc + o_11[:, None], mask=m_11c, other=0).to(COMPUTE)
        # d out / d ix and d out / d iy of the bilinear form, reduced over channels
        b_dx += tl.sum(b_g * (b_wy0c * (b_v01 - b_v00) + b_wy1c * (b_v11 - b_v10)), axis=1)
        b_dy += tl.sum(b_g * (b_wx0c * (b_v10 - b_v00) + b_wx1c * (b_v11 - b_v01)), axis=1)
        # fp32 atomics: bf16 atomic_add does not exist in the interpreter and loses precision on GPU
        p_dfc = p_dfb + o_c[None, :]
        tl.atomic_add(p_dfc + d_00[:, None], (b_wy0c * b_wx0c * b_g).to(p_df.dtype.element_ty), mask=m_00c)
        tl.atomic_add(p_dfc + d_01[:, None], (b_wy0c * b_wx1c * b_g).to(p_df.dtype.element_ty), mask=m_01c)
        tl.atomic_add(p_dfc + d_10[:, None], (b_wy1c * b_wx0c * b_g).to(p_df.dtype.element_ty), mask=m_10c)
        tl.atomic_add(p_dfc + d_11[:, None], (b_wy1c * b_wx1c * b_g).to(p_df.dtype.element_ty), mask=m_11c)
    # d ix / d px = W and d iy / d py = H (ix = px * W - 1/2)
    b_dx = b_dx * W
    b_dy = b_dy * H
    if HAS_CLAMP:
        b_dx = tl.minimum(tl.maximum(b_dx, -clamp), clamp)
        b_dy = tl.minimum(tl.maximum(b_dy, -clamp), clamp)
    p_dq = p_dpt + (i_b * N * P + o_q) * 2
    tl.store(p_dq, b_dx.to(p_dpt.dtype.element_ty), mask=m_q)
    tl.store(p_dq + 1, b_dy.to(p_dpt.dtype.element_ty), mask=m_q)


# ----------------------------------------------------------------------------- host wrappers
def _sample_blocks(C: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_C): 32 channels per step (a 128-byte fp32 row segment, no padding waste at
    C = 96) and >= 32 points per program. From the ptxas statistics of
    `TRITON_INTERPRET=0 python -m kernels.aot` (sm_90 build, triton 3.6; no GPU timings yet):
    4 warps, ~100 registers forward and ~250 backward without spills; 128-channel tiles spilled
    in the backward."""
    block_c = min(triton.next_power_of_2(C), 32)
    return max(32, 1024 // block_c), block_c


def sparse_sample_fwd(features: Tensor, points: Tensor, backend: str) -> Tensor:
    """features (B, H, W, C), points (B, N, P, 2) -> (B, N, P, C) contiguous."""
    if backend != "triton":
        return sparse_sample_reference(features, points).contiguous()
    B, H, W, C = features.shape
    _, N, P, _ = points.shape
    out = _backend.empty_output((B, N, P, C), dtype=features.dtype, device=features.device)
    if out.numel() == 0:
        return out
    BLOCK_Q, BLOCK_C = _sample_blocks(C)
    num_q_blocks = triton.cdiv(N * P, BLOCK_Q)
    sparse_sample_fwd_kernel[(B * num_q_blocks,)](
        features, points, out,
        H, W, C, N, P, num_q_blocks,
        *features.stride(), *points.stride(),
        COMPUTE=_backend.compute_dtype(features, points),
        BLOCK_Q=BLOCK_Q,
        BLOCK_C=BLOCK_C,
        num_warps=4,
    )
    return out


def sparse_sample_bwd(grad_out: Tensor, features: Tensor, points: Tensor, clamp: Optional[float], backend: str):
    """grad_out (B, N, P, C) -> (grad of features (B, H, W, C), grad of points (B, N, P, 2)), both contiguous."""
    if backend != "triton":
        grad_f, grad_p = sparse_sample_reference_backward(grad_out, features, points)
        if clamp is not None:
            grad_p = grad_p.clamp(-clamp, clamp)
        return grad_f.contiguous(), grad_p.contiguous()
    B, H, W, C = features.shape
    _, N, P, _ = points.shape
    compute = _backend.compute_dtype(features, points)
    # scatter-add target: fp32 even for fp16/bf16 maps (fp64 for fp64), cast once at the end
    grad_f = torch.zeros((B, H, W, C), dtype=torch.float64 if compute == tl.float64 else torch.float32,
                         device=features.device)
    grad_p = _backend.empty_output((B, N, P, 2), dtype=points.dtype, device=points.device)
    if grad_p.numel() == 0:
        return grad_f.to(features.dtype), grad_p
    BLOCK_Q, BLOCK_C = _sample_blocks(C)
    num_q_blocks = triton.cdiv(N * P, BLOCK_Q)
    sparse_sample_bwd_kernel[(B * num_q_blocks,)](
        grad_out, features, points, grad_f, grad_p,
        H, W, C, N, P, num_q_blocks, 0.0 if clamp is None else clamp,
        *grad_out.stride(), *features.stride(), *points.stride(),
        HAS_CLAMP=clamp is not None,
        COMPUTE=compute,
        BLOCK_Q=BLOCK_Q,
        BLOCK_C=BLOCK_C,
        num_warps=4,
    )
    return grad_f.to(features.dtype), grad_p


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
    return features.new_empty(features.shape), points.new_empty(points.shape)


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
