"""Sparse feature sampling: bilinear (2-D) or trilinear (3-D) gather of a channels-last map at
per-token points.

Semantics (docs/KERNELS.md, "Sampling") are those of
`F.grid_sample(map, 2 * points - 1, mode="bilinear", padding_mode="zeros", align_corners=False)`
with the 4-D (image) or 5-D (video) map, grid order (x, y[, t]): coordinates are normalised to
[0, 1] with 0 and 1 on the outer edges of the map, points outside read zeros. A point with a
non-finite coordinate (NaN or +-inf, e.g. a diverged RoI) reads NaN in every channel, gets a NaN
gradient and adds nothing to the map's gradient; a non-finite output gradient makes its point's
gradient NaN (even for a point outside the map); on both backends and every device. The gradient
w.r.t. the points can be clamped element-wise (the authors' `RestrictGradNorm`, applied on these
[0, 1] coordinates, one bound per axis).

The map gradient of all the sampling steps of one forward pass goes into one fp32 accumulator:
the ops take and return a *gradient-chain token* (see `map_grad_root`), through which each
step's backward hands the accumulator to the step before it.

Layout of this module: reference -> Triton kernels -> host wrappers -> gradient chain ->
torch.library ops (+ FLOP formula, autograd) -> public function.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import backend as _backend
from .backend import check_inputs, check_points, resolve_backend

# (NaN is written `_INF * 0.0` in the kernels, never a global of its own: the JIT re-checks before
# each launch that the globals a kernel used still compare equal, and NaN != NaN)
_INF = tl.constexpr(float("inf"))


# ----------------------------------------------------------------------------- reference
def _safe_grid(points: Tensor, compute: torch.dtype) -> tuple[Tensor, Tensor]:
    """grid_sample's [-1, 1] grid with non-finite points moved far outside the map (so no device's
    grid_sample reads or writes anything for them), and the NaN marker (B, N, P) that is NaN
    exactly at those points and 0 elsewhere."""
    points = points.to(compute)
    finite = torch.isfinite(points)
    marker = torch.where(finite.all(-1), 0.0, float("nan")).to(compute)
    grid = torch.where(finite, points, -10.0) * 2.0 - 1.0
    return grid, marker


def _map_view(features: Tensor, compute: torch.dtype) -> Tensor:
    """(B, [T,] H, W, C) channels-last -> (B, C, [T,] H, W), a view of the same memory."""
    dims = (0, features.dim() - 1, *range(1, features.dim() - 1))
    return features.to(compute).permute(*dims)


def sparse_sample_reference(features: Tensor, points: Tensor) -> Tensor:
    """Pure-PyTorch sampling (no clamp).

    features (B, H, W, C) with points (B, N, P, 2) as (x, y), or features (B, T, H, W, C) with
    points (B, N, P, 3) as (x, y, t), all in [0, 1] -> (B, N, P, C). fp16/bf16 maps are sampled
    in fp32 (the authors promote the map to fp32 before sampling) and the result is cast back to
    the map's dtype; fp64 stays fp64.
    """
    compute = torch.promote_types(features.dtype, torch.float32)
    grid, marker = _safe_grid(points, compute)
    if points.shape[-1] == 3:
        grid = grid.unsqueeze(1)  # (B, 1, N, P, 3): a depth-1 output volume
    out = F.grid_sample(_map_view(features, compute), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)  # (B, C, [1,] N, P)
    out = out.flatten(1, -3) if points.shape[-1] == 3 else out
    return (out.permute(0, 2, 3, 1) + marker.unsqueeze(-1)).to(features.dtype)


def sparse_sample_reference_backward(grad_out: Tensor, features: Tensor, points: Tensor,
                                     map_grad_dtype: torch.dtype | None = None):
    """Gradients of `sparse_sample_reference` w.r.t. (features, points), unclamped.

    grad_out (B, N, P, C) -> (like features, in `map_grad_dtype` if given; like points). Uses
    ATen's grid_sample backward (custom-op bodies run below autograd, so this is explicit rather
    than `autograd.grad`).
    """
    compute = torch.promote_types(features.dtype, torch.float32)
    grid, marker = _safe_grid(points, compute)
    grad = grad_out.to(compute).permute(0, 3, 1, 2)  # (B, C, N, P)
    if points.shape[-1] == 3:
        grad_map, grad_grid = torch.ops.aten.grid_sampler_3d_backward(
            grad.unsqueeze(2), _map_view(features, compute), grid.unsqueeze(1), 0, 0, False, [True, True]
        )
        grad_grid = grad_grid.squeeze(1)
    else:
        grad_map, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad, _map_view(features, compute), grid, 0, 0, False, [True, True]  # bilinear, zeros, align_corners=False
        )
    grad_f = grad_map.permute(0, *range(2, grad_map.dim()), 1).to(map_grad_dtype or features.dtype)
    # NaN where the point is non-finite, and where a non-finite gradient reached it: ATen's CPU 2-D
    # kernel lets a NaN g through corners outside the map, its CUDA and 3-D kernels do not
    marker = torch.where(torch.isfinite(grad).all(1), marker, float("nan"))
    grad_p = (grad_grid * 2.0 + marker.unsqueeze(-1)).to(points.dtype)  # d(2p - 1)/dp = 2
    return grad_f, grad_p


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _axis(b_p, size):
    """One axis of a point p in [0, 1] (grid_sample, align_corners=False): the lower corner index,
    the weights of the lower and upper corner, and whether each corner lies inside [0, size).

    The source index follows ATen's CUDA `((g + 1) * size - 1) / 2` with g = 2p - 1. Far-away
    points would overflow the int cast: [-2, size + 1] keeps every corner of them outside (NaN
    lands at -2 too; callers mask non-finite points). `tl.floor`, not an int cast: casts truncate
    toward zero and pick the wrong corner left of / above the map.
    """
    b_i = ((b_p * 2 - 1 + 1) * size - 1) * 0.5
    b_i = tl.minimum(tl.maximum(b_i, -2.0), size + 1.0)
    b_i0 = tl.floor(b_i)
    b_w1 = b_i - b_i0
    i_0 = b_i0.to(tl.int32)
    return i_0, 1 - b_w1, b_w1, (i_0 >= 0) & (i_0 < size), (i_0 >= -1) & (i_0 + 1 < size)


@triton.jit
def _corner(dt: tl.constexpr, dy: tl.constexpr, dx: tl.constexpr, s_t, s_h, s_w,
            i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1, m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1,
            IS_3D: tl.constexpr):
    """Offset (int64), inside-mask and weight of corner (t0 + dt, y0 + dy, x0 + dx) of each point,
    and the weights of the other two axes at that corner (for the point gradient)."""
    b_wx = b_wx1 if dx else b_wx0
    b_wy = b_wy1 if dy else b_wy0
    m = (m_x1 if dx else m_x0) & (m_y1 if dy else m_y0)
    o = (i_y + dy).to(tl.int64) * s_h + (i_x + dx).to(tl.int64) * s_w
    if IS_3D:
        b_wt = b_wt1 if dt else b_wt0
        m = m & (m_t1 if dt else m_t0)
        o += (i_t + dt).to(tl.int64) * s_t
    else:
        b_wt = 1.0
    return o, m, b_wx, b_wy, b_wt


@triton.jit
def _point_setup(p_xyz, s_xyz, m_q, H, W, T, COMPUTE: tl.constexpr, IS_3D: tl.constexpr):
    """Load the (x, y[, t]) of a block of points; return which are finite and the per-axis corner data."""
    b_px = tl.load(p_xyz, mask=m_q, other=0).to(COMPUTE)
    b_py = tl.load(p_xyz + s_xyz, mask=m_q, other=0).to(COMPUTE)
    finite = (tl.abs(b_px) < _INF) & (tl.abs(b_py) < _INF)
    i_x, b_wx0, b_wx1, m_x0, m_x1 = _axis(b_px, W)
    i_y, b_wy0, b_wy1, m_y0, m_y1 = _axis(b_py, H)
    if IS_3D:
        b_pt = tl.load(p_xyz + 2 * s_xyz, mask=m_q, other=0).to(COMPUTE)
        finite = finite & (tl.abs(b_pt) < _INF)
        i_t, b_wt0, b_wt1, m_t0, m_t1 = _axis(b_pt, T)
    else:
        i_t, b_wt0, b_wt1, m_t0, m_t1 = i_x, b_wx0, b_wx1, m_x0, m_x1  # unused in 2-D
    return (finite, i_x, b_wx0, b_wx1, m_x0 & m_q & finite, m_x1 & m_q & finite, i_y, b_wy0, b_wy1, m_y0, m_y1,
            i_t, b_wt0, b_wt1, m_t0, m_t1)


@triton.jit
def _gather(p_fb, o_c, m_c, s_t, s_h, s_w,
            i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1, m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1,
            BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr, IS_3D: tl.constexpr):
    """(BLOCK_Q, BLOCK_C) interpolated values: sum over the 4 (8) corners of weight x map[corner, c];
    o_c are channel offsets (already times the channel stride)."""
    b_acc = tl.zeros([BLOCK_Q, BLOCK_C], dtype=COMPUTE)
    for dt in tl.static_range(2 if IS_3D else 1):
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                o, m, b_wx, b_wy, b_wt = _corner(dt, dy, dx, s_t, s_h, s_w, i_x, b_wx0, b_wx1, m_x0, m_x1, i_y,
                                                 b_wy0, b_wy1, m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1, IS_3D)
                b_v = tl.load(p_fb + o[:, None] + o_c[None, :], mask=m[:, None] & m_c[None, :], other=0)
                b_acc += (b_wx * b_wy * b_wt)[:, None] * b_v.to(COMPUTE)
    return b_acc


@triton.jit
def _scatter_reduce(b_g, p_fb, p_dfb, o_c, o_dc, m_c, s_t, s_h, s_w, d_t, d_h, d_w,
                    i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1, m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1,
                    BLOCK_Q: tl.constexpr, COMPUTE: tl.constexpr, IS_3D: tl.constexpr):
    """Backward of `_gather` for one channel block, given the output gradient b_g (BLOCK_Q, BLOCK_C):
    scatter-add weight x g into the map gradient (fp32/fp64, strides d_*; relaxed atomics: nothing
    reads it inside the kernel, so no ordering is needed), and return the partial derivatives of
    the interpolated value w.r.t. the source indices (ix, iy, it), reduced over these channels."""
    b_dx = tl.zeros([BLOCK_Q], dtype=COMPUTE)
    b_dy = tl.zeros([BLOCK_Q], dtype=COMPUTE)
    b_dt = tl.zeros([BLOCK_Q], dtype=COMPUTE)
    for dt in tl.static_range(2 if IS_3D else 1):
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                o, m, b_wx, b_wy, b_wt = _corner(dt, dy, dx, s_t, s_h, s_w, i_x, b_wx0, b_wx1, m_x0, m_x1, i_y,
                                                 b_wy0, b_wy1, m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1, IS_3D)
                d, _, _, _, _ = _corner(dt, dy, dx, d_t, d_h, d_w, i_x, b_wx0, b_wx1, m_x0, m_x1, i_y,
                                        b_wy0, b_wy1, m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1, IS_3D)
                m2 = m[:, None] & m_c[None, :]
                b_v = tl.load(p_fb + o[:, None] + o_c[None, :], mask=m2, other=0).to(COMPUTE)
                # unmasked: a non-finite g reaches the point's gradient even through corners outside the map
                b_gv = tl.sum(b_g * b_v, axis=1)
                # d/dix of prod_a w_a(i_a) at this corner: the x weight's derivative is -1 (lower) or +1 (upper)
                b_dx += (b_gv * b_wy * b_wt) if dx else -(b_gv * b_wy * b_wt)
                b_dy += (b_gv * b_wx * b_wt) if dy else -(b_gv * b_wx * b_wt)
                if IS_3D:
                    b_dt += (b_gv * b_wx * b_wy) if dt else -(b_gv * b_wx * b_wy)
                b_w = (b_wx * b_wy * b_wt)[:, None]
                tl.atomic_add(p_dfb + d[:, None] + o_dc[None, :], (b_w * b_g).to(p_dfb.dtype.element_ty), mask=m2,
                              sem="relaxed")
    return b_dx, b_dy, b_dt


@triton.jit
def _f64_arg(bits):
    """A float64 passed as its int64 bit pattern (`clamp_bits`) back as a float64."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _finish_point_grad(b_d, size, clamp, finite, HAS_CLAMP: tl.constexpr):
    """d/dp = size x d/di (i = p * size - 1/2), the optional clamp (`clamp`: its float64 bits; NaN
    passes through, as torch.clamp), NaN at non-finite points."""
    b_d = b_d * size
    if HAS_CLAMP:
        # maximum then minimum, not tl.clamp(b_d, -bound, bound): sm_90's backend rewrites that symmetric
        # clamp to fmin.xorsign.abs, which has no float64 form (the build fails)
        bound = _f64_arg(clamp).to(b_d.dtype)
        b_d = tl.maximum(b_d, -bound, propagate_nan=tl.PropagateNan.ALL)
        b_d = tl.minimum(b_d, bound, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(finite, b_d, _INF * 0.0)


@triton.jit
def _store_point_grad(p_dptt, o_r, m_r, b_dx, b_dy, b_dt, T, H, W, clamp_x, clamp_y, clamp_t, finite,
                      HAS_CLAMP: tl.constexpr, IS_3D: tl.constexpr):
    """The points' gradient of rows o_r (from d/d source index), clamped, NaN at non-finite points."""
    p_dq = p_dptt + o_r * (3 if IS_3D else 2)
    tl.store(p_dq, _finish_point_grad(b_dx, W, clamp_x, finite, HAS_CLAMP).to(p_dptt.dtype.element_ty), mask=m_r)
    tl.store(p_dq + 1, _finish_point_grad(b_dy, H, clamp_y, finite, HAS_CLAMP).to(p_dptt.dtype.element_ty), mask=m_r)
    if IS_3D:
        tl.store(p_dq + 2, _finish_point_grad(b_dt, T, clamp_t, finite, HAS_CLAMP).to(p_dptt.dtype.element_ty),
                 mask=m_r)


@triton.jit
def sparse_sample_fwd_kernel(
    p_f, p_pt, p_o,
    T, H, W, C, N, P, NUM_Q_BLOCKS,
    s_fb, s_ft, s_fh, s_fw, s_fc,
    s_pb, s_pn, s_pp, s_pxyz,
    COMPUTE: tl.constexpr,
    IS_3D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program per (batch, block of BLOCK_Q flattened (n, p) points), looping over C.

    features (B, [T,] H, W, C) strided (s_ft unused in 2-D), points (B, N, P, 2|3) strided
    -> out (B, N, P, C) contiguous.
    """
    i_pid = tl.program_id(0).to(tl.int64)
    i_b = i_pid // NUM_Q_BLOCKS
    o_q = (i_pid % NUM_Q_BLOCKS) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_q = o_q < N * P
    p_xyz = p_pt + i_b * s_pb + (o_q // P) * s_pn + (o_q % P) * s_pp
    (finite, i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1, m_y0, m_y1,
     i_t, b_wt0, b_wt1, m_t0, m_t1) = _point_setup(p_xyz, s_pxyz, m_q, H, W, T, COMPUTE, IS_3D)
    p_fb = p_f + i_b * s_fb
    p_ob = p_o + (i_b * N * P + o_q)[:, None] * C
    for i_c in range(0, C, BLOCK_C):
        o_c = i_c + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_o = _gather(p_fb, o_c * s_fc, m_c, s_ft, s_fh, s_fw, i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1,
                      m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1, BLOCK_Q, BLOCK_C, COMPUTE, IS_3D)
        b_o = tl.where(finite[:, None], b_o, _INF * 0.0)
        tl.store(p_ob + o_c[None, :], b_o.to(p_o.dtype.element_ty), mask=m_q[:, None] & m_c[None, :])


# the clamps are float64 bit patterns (clamp_bits): specialising on them (divisible by 16, or not)
# would compile the kernel once more for every new set of bounds
@triton.jit(do_not_specialize=["clamp_x", "clamp_y", "clamp_t"])
def sparse_sample_bwd_kernel(
    p_do, p_f, p_pt, p_df, p_dpt,
    T, H, W, C, N, P, NUM_Q_BLOCKS, clamp_x, clamp_y, clamp_t,
    s_gb, s_gn, s_gp, s_gc,
    s_fb, s_ft, s_fh, s_fw, s_fc,
    s_pb, s_pn, s_pp, s_pxyz,
    HAS_CLAMP: tl.constexpr,
    COMPUTE: tl.constexpr,
    IS_3D: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Same grid as the forward. grad of the map: scatter-added into the chain's contiguous
    (B, [T,] H, W, C) fp32 (fp64 for fp64 inputs) accumulator; grad of the points: reduction over
    C in the program, the optional per-axis clamp, stored into a contiguous (B, N, P, 2|3) buffer.
    """
    i_pid = tl.program_id(0).to(tl.int64)
    i_b = i_pid // NUM_Q_BLOCKS
    o_q = (i_pid % NUM_Q_BLOCKS) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_q = o_q < N * P
    o_n = o_q // P
    o_p = o_q % P
    p_xyz = p_pt + i_b * s_pb + o_n * s_pn + o_p * s_pp
    (finite, i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1, m_y0, m_y1,
     i_t, b_wt0, b_wt1, m_t0, m_t1) = _point_setup(p_xyz, s_pxyz, m_q, H, W, T, COMPUTE, IS_3D)
    p_fb = p_f + i_b * s_fb
    p_dfb = p_df + i_b * T * H * W * C
    p_gb = p_do + i_b * s_gb + (o_n * s_gn + o_p * s_gp)[:, None]
    b_dx = tl.zeros([BLOCK_Q], dtype=COMPUTE)
    b_dy = tl.zeros([BLOCK_Q], dtype=COMPUTE)
    b_dt = tl.zeros([BLOCK_Q], dtype=COMPUTE)
    for i_c in range(0, C, BLOCK_C):
        o_c = i_c + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_g = tl.load(p_gb + (o_c * s_gc)[None, :], mask=m_q[:, None] & m_c[None, :], other=0).to(COMPUTE)
        c_dx, c_dy, c_dt = _scatter_reduce(
            b_g, p_fb, p_dfb, o_c * s_fc, o_c, m_c, s_ft, s_fh, s_fw, H * W * C, W * C, C,
            i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1, m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1,
            BLOCK_Q, COMPUTE, IS_3D)
        b_dx += c_dx
        b_dy += c_dy
        b_dt += c_dt
    _store_point_grad(p_dpt + i_b * N * P * (3 if IS_3D else 2), o_q, m_q, b_dx, b_dy, b_dt, T, H, W,
                      clamp_x, clamp_y, clamp_t, finite, HAS_CLAMP, IS_3D)


# ----------------------------------------------------------------------------- host wrappers
def map_shape(features: Tensor) -> tuple[int, int, int, int, int]:
    """(B, T, H, W, C) of a (B, H, W, C) image map (T = 1) or a (B, T, H, W, C) video map."""
    if features.dim() == 4:
        B, H, W, C = features.shape
        return B, 1, H, W, C
    return tuple(features.shape)


def map_strides(features: Tensor) -> tuple[int, int, int, int, int]:
    """Strides (b, t, h, w, c) in elements; t is 0 for an image map."""
    if features.dim() == 4:
        s_b, s_h, s_w, s_c = features.stride()
        return s_b, 0, s_h, s_w, s_c
    return features.stride()


def _sample_blocks(C: int, is_3d: bool) -> tuple[int, int, int]:
    """(BLOCK_Q, BLOCK_C, num_warps): 32 channels per step (a 128-byte fp32 row segment, no padding
    waste at C = 96) and >= 32 points per program; 3-D has twice the corners, so half the points.
    Checked with `python -m kernels.aot` (registers, spills) for every arch."""
    block_c = min(triton.next_power_of_2(C), 32)
    block_q = max(32, 1024 // block_c)
    return (block_q // 2 if is_3d else block_q), block_c, 4


def sparse_sample_fwd(features: Tensor, points: Tensor, backend: str) -> Tensor:
    """features (B, [T,] H, W, C), points (B, N, P, 2|3) -> (B, N, P, C) contiguous."""
    if backend != "triton":
        return sparse_sample_reference(features, points).contiguous()
    B, T, H, W, C = map_shape(features)
    _, N, P, D = points.shape
    out = _backend.empty_output((B, N, P, C), dtype=features.dtype, device=features.device)
    if out.numel() == 0:
        return out
    block_q, block_c, warps = _sample_blocks(C, D == 3)
    num_q_blocks = triton.cdiv(N * P, block_q)
    _backend.launch(sparse_sample_fwd_kernel, (B * num_q_blocks,), (
        features, points, out,
        T, H, W, C, N, P, num_q_blocks,
        *map_strides(features), *points.stride(),
    ), [dict(COMPUTE=_backend.compute_dtype(features, points), IS_3D=D == 3, BLOCK_Q=block_q, BLOCK_C=block_c,
             num_warps=warps)], features.device)
    return out


def clamp_bits(clamp: Sequence[float] | None) -> tuple[int, int, int]:
    """The per-axis clamps (x, y, t; 0 where absent) as the int64 bit patterns of their float64 values:
    a Python float kernel argument is typed fp32 by the compiled JIT, which would round a bound such
    as 0.05 before it clamps a float64 gradient (triton 3.9's interpreter keeps the float, so the CPU
    suite could not see it; 3.6's rounds it too). The kernels bitcast them back (`_f64_arg`)."""
    values = [0.0, 0.0, 0.0] if clamp is None else list(clamp) + [0.0] * (3 - len(clamp))
    return tuple(struct.unpack("<q", struct.pack("<d", float(v)))[0] for v in values[:3])


def sparse_sample_bwd(grad_out: Tensor, features: Tensor, points: Tensor, grad_map: Tensor,
                      clamp: Sequence[float] | None, backend: str) -> Tensor:
    """grad_out (B, N, P, C); adds the map gradient into `grad_map` (the chain's contiguous fp32/fp64
    accumulator shaped like features) and returns the points' gradient (B, N, P, 2|3), contiguous."""
    if backend != "triton":
        grad_f, grad_p = sparse_sample_reference_backward(grad_out, features, points, grad_map.dtype)
        grad_map += grad_f
        if clamp is not None:
            grad_p = torch.maximum(torch.minimum(grad_p, grad_p.new_tensor(clamp)), -grad_p.new_tensor(clamp))
        return grad_p.contiguous()
    _backend.check_deterministic("sparse_sample backward (Triton)")
    B, T, H, W, C = map_shape(features)
    _, N, P, D = points.shape
    grad_p = _backend.empty_output((B, N, P, D), dtype=points.dtype, device=points.device)
    if grad_p.numel() == 0 or C == 0:
        return grad_p.zero_() if C == 0 else grad_p
    block_q, block_c, warps = _sample_blocks(C, D == 3)
    num_q_blocks = triton.cdiv(N * P, block_q)
    _backend.launch(sparse_sample_bwd_kernel, (B * num_q_blocks,), (
        grad_out, features, points, grad_map, grad_p,
        T, H, W, C, N, P, num_q_blocks, *clamp_bits(clamp),
        *grad_out.stride(), *map_strides(features), *points.stride(),
    ), [dict(HAS_CLAMP=clamp is not None, COMPUTE=_backend.compute_dtype(features, points), IS_3D=D == 3,
             BLOCK_Q=block_q, BLOCK_C=block_c, num_warps=warps)], grad_out.device)
    return grad_p


# ----------------------------------------------------------------------------- gradient chain
def chain_token(features: Tensor) -> Tensor:
    """A token shaped like `features` in the accumulation dtype, holding no memory (zero strides):
    what flows backward through it is the map-gradient accumulator."""
    acc = _backend.accumulate_dtype(features.dtype)
    return torch.zeros((), dtype=acc, device=features.device).expand(features.shape)


def accumulator(grad_token: Tensor | None, features: Tensor) -> Tensor:
    """The chain's accumulator: the gradient that reached a token (the buffer a later step filled),
    or a fresh zero buffer for the last step of the chain."""
    acc = _backend.accumulate_dtype(features.dtype)
    if (grad_token is not None and grad_token.dtype == acc and grad_token.is_contiguous()
            and grad_token.shape == features.shape):
        return grad_token
    buffer = torch.zeros(features.shape, dtype=acc, device=features.device)
    if grad_token is not None:
        buffer += grad_token
    return buffer


@torch.library.custom_op("sparseformer::map_grad_root", mutates_args=())
def map_grad_root(features: Tensor) -> Tensor:
    """The first token of a feature map's gradient chain. Its backward casts the accumulated map
    gradient once to the map's dtype: that is the map's gradient from every sampling step."""
    return chain_token(features)


@map_grad_root.register_fake
def _(features):
    return chain_token(features)


def _root_setup(ctx, inputs, output):
    ctx.dtype = inputs[0].dtype


def _root_backward(ctx, grad):
    return None if grad is None else grad.to(ctx.dtype)


map_grad_root.register_autograd(_root_backward, setup_context=_root_setup)


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("sparseformer::sparse_sample", mutates_args=())
def _sparse_sample_op(
    features: Tensor, points: Tensor, token: Tensor, clamp: list[float] | None, backend: str
) -> tuple[Tensor, Tensor]:
    return sparse_sample_fwd(features, points, backend), chain_token(features)


@_sparse_sample_op.register_fake
def _(features, points, token, clamp, backend):
    B, N, P, _ = points.shape
    return features.new_empty(B, N, P, features.shape[-1]), chain_token(features)


@torch.library.custom_op("sparseformer::sparse_sample_backward", mutates_args=("grad_map",))
def _sparse_sample_backward_op(
    grad_out: Tensor, features: Tensor, points: Tensor, grad_map: Tensor, clamp: list[float] | None, backend: str
) -> Tensor:
    return sparse_sample_bwd(grad_out, features, points, grad_map, clamp, backend)


@_sparse_sample_backward_op.register_fake
def _(grad_out, features, points, grad_map, clamp, backend):
    return points.new_empty(points.shape)


def _setup_context(ctx, inputs, output):
    features, points, _, clamp, backend = inputs
    ctx.save_for_backward(features, points)
    ctx.clamp, ctx.backend = clamp, backend


def _backward(ctx, grad_out, grad_token):
    features, points = ctx.saved_tensors
    grad_map = accumulator(grad_token, features)
    grad_p = _sparse_sample_backward_op(grad_out.contiguous(), features, points, grad_map, ctx.clamp, ctx.backend)
    return None, grad_p, grad_map, None, None


_sparse_sample_op.register_autograd(_backward, setup_context=_setup_context)


def sampling_flops(B: int, N: int, P: int, C: int, ndim: int) -> int:
    """FLOPs (2 x MACs) of interpolating B*N*P points of C channels: 4 (2-D) or 8 (3-D) multiply-adds
    per output element (fvcore's grid_sampler convention)."""
    return 2 * (4 if ndim == 2 else 8) * B * N * P * C


@register_flop_formula(torch.ops.sparseformer.sparse_sample)
def _sparse_sample_flops(features_shape, points_shape, *args, out_shape=None, **kwargs) -> int:
    B, N, P, D = points_shape
    return sampling_flops(B, N, P, features_shape[-1], D)


@register_flop_formula(torch.ops.sparseformer.sparse_sample_backward)
def _sparse_sample_backward_flops(grad_shape, features_shape, points_shape, *args, out_shape=None, **kwargs) -> int:
    B, N, P, C = grad_shape
    return 2 * sampling_flops(B, N, P, C, points_shape[-1])  # grad of the map (scatter) + of the points (reduction)


# ----------------------------------------------------------------------------- public function
def check_sampling_inputs(op: str, features: Tensor, points: Tensor) -> None:
    """Shapes, devices and dtypes of a (features, points) pair, or a ValueError saying what is wrong."""
    check_inputs(op, features=features, points=points)
    if points.dim() != 4 or points.shape[-1] not in (2, 3):
        raise ValueError(f"{op}: points must be (B, N, P, 2) for an image map or (B, N, P, 3) for a video map, "
                         f"got shape {tuple(points.shape)}")
    ndim = points.shape[-1]
    if features.dim() != ndim + 2:
        expected = "(B, H, W, C)" if ndim == 2 else "(B, T, H, W, C)"
        raise ValueError(f"{op}: points with {ndim} coordinates sample a {expected} map, got features of shape "
                         f"{tuple(features.shape)}")
    if points.shape[0] != features.shape[0]:
        raise ValueError(f"{op}: batch of points ({points.shape[0]}) != batch of features ({features.shape[0]})")
    if 0 in features.shape[1:-1]:  # (grid_sample refuses one; the kernel would read zeros: both refuse)
        axes = "(H, W)" if ndim == 2 else "(T, H, W)"
        raise ValueError(f"{op}: the map has an empty {axes} axis, features of shape {tuple(features.shape)}: "
                         "there is nothing to sample")
    check_points(op, points, features)


def check_clamp(op: str, clamp, ndim: int) -> list[float] | None:
    """point_grad_clamp as one bound per axis: None, a number (every axis) or one number per axis, all > 0."""
    if clamp is None:
        return None
    one = isinstance(clamp, (int, float)) or (isinstance(clamp, Tensor) and clamp.dim() == 0)
    values = [float(clamp)] * ndim if one else [float(v) for v in clamp]
    if len(values) != ndim or not all(v > 0 for v in values):
        raise ValueError(f"{op}: point_grad_clamp must be positive, one number or {ndim} (one per axis), got {clamp!r}")
    return values


def sparse_sample(
    features: Tensor, points: Tensor, *, point_grad_clamp=None, backend: str = "auto"
) -> Tensor:
    """Bilinearly (trilinearly) sample `features` at `points`.

    Args:
        features: (B, H, W, C) channels-last image map, or (B, T, H, W, C) video map.
        points: (B, N, P, 2) as (x, y), or (B, N, P, 3) as (x, y, t), normalised to [0, 1]; 0 and 1
            are the outer edges of the map (`align_corners=False`), points outside read zeros.
            float32 (float64 with a float64 map).
        point_grad_clamp: None, or a bound (one number, or one per axis) to which the gradient
            w.r.t. `points` is clamped element-wise in backward.
        backend: "auto" (Triton on CUDA, reference otherwise), "triton" or "torch".
    Returns:
        (B, N, P, C) in the dtype of `features`. Several calls on one map accumulate its gradient
        in one buffer only through `kernels.FeatureMap`; each call of this function has its own.
    """
    check_sampling_inputs("sparse_sample", features, points)
    clamp = check_clamp("sparse_sample", point_grad_clamp, points.shape[-1])
    out, _ = _sparse_sample_op(features, points, map_grad_root(features), clamp,
                               resolve_backend(backend, features.device))
    return out
