"""Fused sparse sampling + adaptive mixing, and `FeatureMap`, the way the model samples a map.

`sample_and_mix` computes, per token, adaptive_mix(sparse_sample(features, points), params, ...)
in one program: the token's P x C tile is gathered from the map straight into the first GEMM's
operand and mixed on chip, so the sampled tile never reaches memory. The backward recomputes
(it saves only the map, the points, the generator output and the biases): it regathers the tile,
runs the mixing backward, and turns the tile's gradient into the points' gradient (reduced over
C on chip) and the map's gradient (relaxed fp32 atomics into the map's gradient chain). Its
reference is the composition of the two references (kernels/sampling.py, kernels/mixing.py).

Layout of this module: reference -> Triton kernels -> host wrappers -> torch.library ops
(+ FLOP formula, autograd) -> public function and FeatureMap.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import backend as _backend
from .backend import check_inputs, check_same_dtype, resolve_backend
from .mixing import (
    _dx_block,
    _mix_backward,
    _mix_forward,
    adaptive_mix_reference,
    adaptive_mix_reference_backward,
    backward_buffers,
    check_mix_shapes,
    mix_configs,
    mix_flops,
)
from .sampling import (
    _INF,
    _gather,
    _point_setup,
    _scatter_reduce,
    _sparse_sample_op,
    _store_point_grad,
    accumulator,
    chain_token,
    check_clamp,
    check_sampling_inputs,
    clamp_bits,
    map_grad_root,
    map_shape,
    map_strides,
    sampling_flops,
    sparse_sample_reference,
    sparse_sample_reference_backward,
)


# ----------------------------------------------------------------------------- reference
def sample_and_mix_reference(features: Tensor, points: Tensor, params: Tensor, channel_bias: Tensor,
                             spatial_bias: Tensor) -> Tensor:
    """adaptive_mix_reference(sparse_sample_reference(features, points) in params' dtype, ...).

    features (B, [T,] H, W, C), points (B, N, P, 2|3), params (B, N, C*C + P*P), channel_bias (C,),
    spatial_bias (P,) -> (B, N, P, C) in params' dtype.
    """
    x = sparse_sample_reference(features, points).to(params.dtype)
    return adaptive_mix_reference(x, params, channel_bias, spatial_bias)


def sample_and_mix_reference_backward(grad_out: Tensor, features: Tensor, points: Tensor, params: Tensor,
                                      channel_bias: Tensor, spatial_bias: Tensor,
                                      map_grad_dtype: torch.dtype | None = None):
    """Gradients of `sample_and_mix_reference` w.r.t. (features, points, params, channel_bias,
    spatial_bias), unclamped; the map's in `map_grad_dtype` if given."""
    x = sparse_sample_reference(features, points).to(params.dtype)
    g_x, g_params, g_bc, g_bs = adaptive_mix_reference_backward(grad_out, x, params, channel_bias, spatial_bias)
    g_f, g_p = sparse_sample_reference_backward(g_x.to(features.dtype), features, points, map_grad_dtype)
    return g_f, g_p, g_params, g_bc, g_bs


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _sample_rows(p_fb, p_ptt, row0, P, T, H, W, C, s_ft, s_fh, s_fw, s_fc, s_pp, s_pxyz,
                 ROWS: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE: tl.constexpr, IS_3D: tl.constexpr):
    """Rows row0 .. row0 + ROWS of one token's sampled (P, C) tile, zero-padded to (ROWS, BLOCK_C),
    NaN in the rows of non-finite points."""
    o_r = row0 + tl.arange(0, ROWS)
    m_r = o_r < P
    (finite, i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1, m_y0, m_y1,
     i_t, b_wt0, b_wt1, m_t0, m_t1) = _point_setup(p_ptt + o_r * s_pp, s_pxyz, m_r, H, W, T, COMPUTE, IS_3D)
    o_c = tl.arange(0, BLOCK_C)
    b_x = _gather(p_fb, o_c * s_fc, o_c < C, s_ft, s_fh, s_fw, i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1,
                  m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1, ROWS, BLOCK_C, COMPUTE, IS_3D)
    return tl.where(finite[:, None], b_x, _INF * 0.0)


@triton.jit
def sample_mix_fwd_kernel(
    p_f, p_pt, p_prm, p_bc, p_bs, p_o,
    T, H, W, C, N, P,
    s_fb, s_ft, s_fh, s_fw, s_fc,
    s_pb, s_pn, s_pp, s_pxyz,
    s_mb, s_mn, s_mk,
    s_bc, s_bs,
    COMPUTE: tl.constexpr, IS_3D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PA: tl.constexpr, PB: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per token: gather its (P, C) tile from the (B, [T,] H, W, C) map, mix it ->
    out (B, N, P, C) contiguous in params' dtype."""
    i_t = tl.program_id(0).to(tl.int64)
    i_b = i_t // N
    i_n = i_t % N
    p_fb = p_f + i_b * s_fb
    p_ptt = p_pt + i_b * s_pb + i_n * s_pn
    b_xa = _sample_rows(p_fb, p_ptt, 0, P, T, H, W, C, s_ft, s_fh, s_fw, s_fc, s_pp, s_pxyz, PA, BLOCK_C, COMPUTE,
                        IS_3D)
    b_xb = _sample_rows(p_fb, p_ptt, PA, P, T, H, W, C, s_ft, s_fh, s_fw, s_fc, s_pp, s_pxyz, PB, BLOCK_C, COMPUTE,
                        IS_3D)
    _mix_forward(b_xa.to(DOT), b_xb.to(DOT), p_prm + i_b * s_mb + i_n * s_mn, s_mk, p_bc, s_bc, p_bs, s_bs,
                 p_o + i_t * P * C, C, 1, P, C, ACC, DOT, DOT_PRECISION, PA, PB, HAS_B, BLOCK_C, BLOCK_CO)


# the clamps are float64 bit patterns (clamp_bits): specialising on them (divisible by 16, or not)
# would compile the kernel once more for every new set of bounds
@triton.jit(do_not_specialize=["clamp_x", "clamp_y", "clamp_t"])
def sample_mix_bwd_kernel(
    p_do, p_f, p_pt, p_prm, p_bc, p_bs,
    p_df, p_dpt, p_dprm, p_dbc, p_dbs, p_dh,
    T, H, W, C, N, P, clamp_x, clamp_y, clamp_t,
    s_gb, s_gn, s_gp, s_gc,
    s_fb, s_ft, s_fh, s_fw, s_fc,
    s_pb, s_pn, s_pp, s_pxyz,
    s_mb, s_mn, s_mk,
    s_bc, s_bs,
    HAS_CLAMP: tl.constexpr, COMPUTE: tl.constexpr, IS_3D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PA: tl.constexpr, PB: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Same grid as the forward. Regathers the tile, runs the mixing backward, then the sampling
    backward from the tile's gradient: map gradient into the chain's contiguous fp32 (fp64)
    accumulator, points' gradient (B, N, P, 2|3), params' gradient (B, N, C*C + P*P) and the
    per-token bias partials (B*N, C), (B*N, P), all contiguous; dh is a (B*N, P, C) scratch."""
    i_t = tl.program_id(0).to(tl.int64)
    i_b = i_t // N
    i_n = i_t % N
    p_fb = p_f + i_b * s_fb
    p_ptt = p_pt + i_b * s_pb + i_n * s_pn
    b_xa = _sample_rows(p_fb, p_ptt, 0, P, T, H, W, C, s_ft, s_fh, s_fw, s_fc, s_pp, s_pxyz, PA, BLOCK_C, COMPUTE,
                        IS_3D).to(DOT)
    b_xb = _sample_rows(p_fb, p_ptt, PA, P, T, H, W, C, s_ft, s_fh, s_fw, s_fc, s_pp, s_pxyz, PB, BLOCK_C, COMPUTE,
                        IS_3D).to(DOT)
    p_prmt = p_prm + i_b * s_mb + i_n * s_mn
    p_dht = p_dh + i_t * P * C
    _mix_backward(
        b_xa, b_xb, p_prmt, s_mk, p_bc, s_bc, p_bs, s_bs,
        p_do + i_b * s_gb + i_n * s_gn, s_gp, s_gc, p_dprm + i_t * (C * C + P * P), p_dbc + i_t * C, p_dbs + i_t * P,
        p_dht, P, C, ACC, DOT, DOT_PRECISION, PA, PB, HAS_B, BLOCK_C, BLOCK_CO)
    # sampling backward from the tile's gradient, a row block and a channel block at a time (as
    # _dx_block makes it): the x gradient is never held whole
    p_dfb = p_df + i_b * T * H * W * C
    p_dptt = p_dpt + i_t * P * (3 if IS_3D else 2)
    _sample_rows_backward(p_dht, p_prmt, s_mk, p_fb, p_dfb, p_ptt, p_dptt, 0, P, T, H, W, C, s_ft, s_fh, s_fw, s_fc,
                          s_pp, s_pxyz, clamp_x, clamp_y, clamp_t, HAS_CLAMP, COMPUTE, IS_3D, ACC, DOT, DOT_PRECISION,
                          PA, BLOCK_K, BLOCK_CO)
    if HAS_B:
        _sample_rows_backward(p_dht, p_prmt, s_mk, p_fb, p_dfb, p_ptt, p_dptt, PA, P, T, H, W, C, s_ft, s_fh, s_fw,
                              s_fc, s_pp, s_pxyz, clamp_x, clamp_y, clamp_t, HAS_CLAMP, COMPUTE, IS_3D, ACC, DOT,
                              DOT_PRECISION, PB, BLOCK_K, BLOCK_CO)


@triton.jit
def _sample_rows_backward(
    p_dht, p_prmt, s_mk, p_fb, p_dfb, p_ptt, p_dptt, row0, P, T, H, W, C, s_ft, s_fh, s_fw, s_fc, s_pp, s_pxyz,
    clamp_x, clamp_y, clamp_t, HAS_CLAMP: tl.constexpr, COMPUTE: tl.constexpr, IS_3D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    """Backward of `_sample_rows` for rows row0 .. row0 + ROWS: their x gradient (a channel block at a
    time from `_dx_block`) scattered into the map gradient and reduced into the points' gradient,
    stored clamped (NaN at non-finite points)."""
    o_r = row0 + tl.arange(0, ROWS)
    m_r = o_r < P
    (finite, i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1, m_y0, m_y1,
     i_t, b_wt0, b_wt1, m_t0, m_t1) = _point_setup(p_ptt + o_r * s_pp, s_pxyz, m_r, H, W, T, COMPUTE, IS_3D)
    b_gx = tl.zeros([ROWS], dtype=COMPUTE)
    b_gy = tl.zeros([ROWS], dtype=COMPUTE)
    b_gt = tl.zeros([ROWS], dtype=COMPUTE)
    for k0 in range(0, C, BLOCK_K):
        b_dx = _dx_block(p_dht, p_prmt, s_mk, row0, k0, P, C, ACC, DOT, DOT_PRECISION, ROWS, BLOCK_K, BLOCK_CO)
        o_k = k0 + tl.arange(0, BLOCK_K)
        c_x, c_y, c_t = _scatter_reduce(
            b_dx.to(COMPUTE), p_fb, p_dfb, o_k * s_fc, o_k, o_k < C, s_ft, s_fh, s_fw, H * W * C, W * C, C,
            i_x, b_wx0, b_wx1, m_x0, m_x1, i_y, b_wy0, b_wy1, m_y0, m_y1, i_t, b_wt0, b_wt1, m_t0, m_t1,
            ROWS, COMPUTE, IS_3D)
        b_gx += c_x
        b_gy += c_y
        b_gt += c_t
    _store_point_grad(p_dptt, o_r, m_r, b_gx, b_gy, b_gt, T, H, W, clamp_x, clamp_y, clamp_t, finite, HAS_CLAMP,
                      IS_3D)


# ----------------------------------------------------------------------------- host wrappers
def check_fused_inputs(features: Tensor, points: Tensor, params: Tensor, channel_bias: Tensor,
                       spatial_bias: Tensor) -> None:
    """The mixing inputs of sample_and_mix: one dtype, the map's device, shapes for the map's C and the points' P."""
    check_inputs("sample_and_mix", features=features, params=params, channel_bias=channel_bias,
                 spatial_bias=spatial_bias)
    check_same_dtype("sample_and_mix", params=params, channel_bias=channel_bias, spatial_bias=spatial_bias)
    B, N, P, _ = points.shape
    check_mix_shapes("sample_and_mix", torch.empty(B, N, P, features.shape[-1], device="meta"), params,
                     channel_bias, spatial_bias)


def _configs(features: Tensor, points: Tensor, params: Tensor, P: int, C: int, backward: bool = False) -> list[dict]:
    """mix_configs, plus the sampling constexprs; the backward's epilogue gathers and scatters 4 (8)
    corners per point besides the x gradient's block, so it takes 16 channels at a time (with 32, it
    spills on sm_90). The 16-bit 3-D forward runs its K loop unpipelined: pipelined, its 8-corner
    gathers spill 12 B on sm_90 with triton 3.6's ptxas (none with 3.9's; unpipelined, none with either)."""
    is_3d = points.shape[-1] == 3
    configs = []
    for cfg in mix_configs(P, C, params.dtype, _backend.target(features.device), backward):
        if backward:
            cfg["BLOCK_K"] = min(16, cfg["BLOCK_K"])
        elif is_3d and params.dtype in (torch.float16, torch.bfloat16):
            cfg["num_stages"] = 1
        cfg = dict(COMPUTE=_backend.compute_dtype(features, points), IS_3D=is_3d, **cfg)
        if cfg not in configs:
            configs.append(cfg)
    return configs


def sample_and_mix_fwd(features: Tensor, points: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor,
                       backend: str) -> Tensor:
    """-> (B, N, P, C) contiguous, in params' dtype."""
    if backend != "triton":
        return sample_and_mix_reference(features, points, params, channel_bias, spatial_bias).contiguous()
    B, T, H, W, C = map_shape(features)
    _, N, P, _ = points.shape
    out = _backend.empty_output((B, N, P, C), dtype=params.dtype, device=params.device)
    if out.numel() == 0:
        return out
    _backend.launch(sample_mix_fwd_kernel, (B * N,), (
        features, points, params, channel_bias, spatial_bias, out,
        T, H, W, C, N, P,
        *map_strides(features), *points.stride(), *params.stride(), *channel_bias.stride(), *spatial_bias.stride(),
    ), _configs(features, points, params, P, C), features.device)
    return out


def sample_and_mix_bwd(grad_out: Tensor, features: Tensor, points: Tensor, params: Tensor, channel_bias: Tensor,
                       spatial_bias: Tensor, grad_map: Tensor, clamp: list[float] | None, backend: str):
    """Adds the map gradient into `grad_map` (the chain's accumulator) and returns contiguous
    gradients of (points, params, channel_bias, spatial_bias)."""
    if backend != "triton":
        g_f, g_p, g_params, g_bc, g_bs = sample_and_mix_reference_backward(
            grad_out, features, points, params, channel_bias, spatial_bias, grad_map.dtype)
        grad_map += g_f
        if clamp is not None:
            bound = g_p.new_tensor(clamp)
            g_p = torch.maximum(torch.minimum(g_p, bound), -bound)
        return g_p.contiguous(), g_params.contiguous(), g_bc, g_bs
    _backend.check_deterministic("sample_and_mix backward (Triton)")
    B, T, H, W, C = map_shape(features)
    _, N, P, D = points.shape
    dev = params.device
    d_points = _backend.empty_output((B, N, P, D), dtype=points.dtype, device=dev)
    d_params = _backend.empty_output((B, N, C * C + P * P), dtype=params.dtype, device=dev)
    dbc, dbs, dh = backward_buffers(B, N, P, C, params.dtype, dev)
    if B * N > 0 and P * C > 0:
        _backend.launch(sample_mix_bwd_kernel, (B * N,), (
            grad_out, features, points, params, channel_bias, spatial_bias,
            grad_map, d_points, d_params, dbc, dbs, dh,
            T, H, W, C, N, P, *clamp_bits(clamp),
            *grad_out.stride(), *map_strides(features), *points.stride(), *params.stride(),
            *channel_bias.stride(), *spatial_bias.stride(),
        ), [{"HAS_CLAMP": clamp is not None, **cfg} for cfg in _configs(features, points, params, P, C, backward=True)],
            dev)
    else:  # nothing to mix (P or C is 0): every gradient is zero, as the reference's
        for t in (d_points, d_params, dbc, dbs):
            t.zero_()
    return d_points, d_params, dbc.sum(0).to(params.dtype), dbs.sum(0).to(params.dtype)


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("sparseformer::sample_and_mix", mutates_args=())
def _sample_mix_op(
    features: Tensor, points: Tensor, token: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor,
    clamp: list[float] | None, backend: str,
) -> tuple[Tensor, Tensor]:
    return sample_and_mix_fwd(features, points, params, channel_bias, spatial_bias, backend), chain_token(features)


@_sample_mix_op.register_fake
def _(features, points, token, params, channel_bias, spatial_bias, clamp, backend):
    B, N, P, _ = points.shape
    return params.new_empty(B, N, P, features.shape[-1]), chain_token(features)


@torch.library.custom_op("sparseformer::sample_and_mix_backward", mutates_args=("grad_map",))
def _sample_mix_backward_op(
    grad_out: Tensor, features: Tensor, points: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor,
    grad_map: Tensor, clamp: list[float] | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return sample_and_mix_bwd(grad_out, features, points, params, channel_bias, spatial_bias, grad_map, clamp,
                              backend)


@_sample_mix_backward_op.register_fake
def _(grad_out, features, points, params, channel_bias, spatial_bias, grad_map, clamp, backend):
    return tuple(t.new_empty(t.shape) for t in (points, params, channel_bias, spatial_bias))


def _setup_context(ctx, inputs, output):
    features, points, _, params, channel_bias, spatial_bias, clamp, backend = inputs
    ctx.save_for_backward(features, points, params, channel_bias, spatial_bias)
    ctx.clamp, ctx.backend = clamp, backend


def _backward(ctx, grad_out, grad_token):
    features, points, params, channel_bias, spatial_bias = ctx.saved_tensors
    grad_map = accumulator(grad_token, features)
    g_p, g_params, g_bc, g_bs = _sample_mix_backward_op(
        grad_out.contiguous(), features, points, params, channel_bias, spatial_bias, grad_map, ctx.clamp, ctx.backend)
    return None, g_p, grad_map, g_params, g_bc, g_bs, None, None


_sample_mix_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.sparseformer.sample_and_mix)
def _sample_mix_flops(features_shape, points_shape, token_shape, params_shape, *args, out_shape=None, **kwargs) -> int:
    B, N, P, D = points_shape
    C = features_shape[-1]
    return sampling_flops(B, N, P, C, D) + mix_flops(B, N, P, C)


@register_flop_formula(torch.ops.sparseformer.sample_and_mix_backward)
def _sample_mix_backward_flops(grad_shape, features_shape, points_shape, *args, out_shape=None, **kwargs) -> int:
    B, N, P, C = grad_shape
    D = points_shape[-1]
    # recomputed forward + the backward of each part
    return 3 * sampling_flops(B, N, P, C, D) + 3 * mix_flops(B, N, P, C)


# ----------------------------------------------------------------------------- public function and FeatureMap
class FeatureMap:
    """A channels-last feature map that one forward pass samples several times (SparseFormer's 5
    sampling steps): the map's gradient from every step goes into one fp32 accumulator, handed
    from each step's backward to the one before it, and is cast once to the map's dtype.

        fmap = FeatureMap(features, point_grad_clamp=1 / 56, backend="auto")
        x = fmap.sample(points)                                  # (B, N, P, C)
        y = fmap.sample_and_mix(points, params, beta_c, beta_s)  # fused: (B, N, P, C), never materialising x

    features (B, H, W, C) with points (B, N, P, 2), or (B, T, H, W, C) with points (B, N, P, 3).
    """

    def __init__(self, features: Tensor, point_grad_clamp=None, backend: str = "auto", *, caller: str = "FeatureMap"):
        # caller: the public function errors are named after (sample_and_mix builds a FeatureMap)
        if not isinstance(features, Tensor) or features.dim() not in (4, 5):
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"{caller}: features must be (B, H, W, C) or (B, T, H, W, C), got {shape}")
        self.features = features
        self.ndim = features.dim() - 2
        self.clamp = check_clamp(caller, point_grad_clamp, self.ndim)
        self.backend = resolve_backend(backend, features.device)
        self._token = map_grad_root(features)

    def sample(self, points: Tensor) -> Tensor:
        """points (B, N, P, 2|3) -> sampled (B, N, P, C) in the map's dtype."""
        check_sampling_inputs("FeatureMap.sample", self.features, points)
        out, self._token = _sparse_sample_op(self.features, points, self._token, self.clamp, self.backend)
        return out

    def sample_and_mix(self, points: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor) -> Tensor:
        """adaptive_mix(self.sample(points) in params' dtype, params, channel_bias, spatial_bias), fused."""
        check_sampling_inputs("sample_and_mix", self.features, points)
        check_fused_inputs(self.features, points, params, channel_bias, spatial_bias)
        out, self._token = _sample_mix_op(self.features, points, self._token, params, channel_bias, spatial_bias,
                                          self.clamp, self.backend)
        return out


def sample_and_mix(features: Tensor, points: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor, *,
                   point_grad_clamp=None, backend: str = "auto") -> Tensor:
    """Fused `adaptive_mix(sparse_sample(features, points).to(params.dtype), params, channel_bias, spatial_bias)`.

    Args:
        features: (B, H, W, C) or (B, T, H, W, C) channels-last map.
        points: (B, N, P, 2) or (B, N, P, 3) in [0, 1], float32 (float64 with a float64 map).
        params: (B, N, C*C + P*P) generator output (Mc row-major (C_in, C_out), then Ms (P_out, P_in)).
        channel_bias: (C,), spatial_bias: (P,), in params' dtype.
        point_grad_clamp: None or a bound (one number or one per axis) for the points' gradient.
        backend: "auto" | "triton" | "torch".
    Returns:
        (B, N, P, C) in params' dtype.
    """
    fmap = FeatureMap(features, point_grad_clamp, backend, caller="sample_and_mix")
    return fmap.sample_and_mix(points, params, channel_bias, spatial_bias)
