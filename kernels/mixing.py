"""Adaptive mixing: per-token dynamic channel and spatial GEMMs (AdaMixer-style, one group).

For every token (b, n), with x its (P, C) sampled features (SPEC.md, step 5):
    h   = GELU(x @ Mc + beta_c)          Mc: (C_in, C_out), beta_c: (C,)
    out = GELU(Ms @ h + beta_s[:, None]) Ms: (P_out, P_in), beta_s: (P,)

Layout of this module: reference -> Triton kernels -> host wrappers -> torch.library ops
(+ FLOP formula, autograd) -> public function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import backend as _backend
from .backend import check_inputs, check_same_dtype, resolve_backend


# ----------------------------------------------------------------------------- reference
def adaptive_mix_reference(
    x: Tensor, channel_weight: Tensor, channel_bias: Tensor, spatial_weight: Tensor, spatial_bias: Tensor
) -> Tensor:
    """The authors' baddbmm chain, in the inputs' dtype.

    x (B, N, P, C), channel_weight (B, N, C, C), channel_bias (C,),
    spatial_weight (B, N, P, P), spatial_bias (P,) -> (B, N, P, C).
    """
    B, N, P, C = x.shape
    h = torch.baddbmm(channel_bias.view(1, 1, C), x.reshape(B * N, P, C), channel_weight.reshape(B * N, C, C))
    h = F.gelu(h)
    out = torch.baddbmm(spatial_bias.view(1, P, 1), spatial_weight.reshape(B * N, P, P), h)
    return F.gelu(out).view(B, N, P, C)


def adaptive_mix_reference_backward(
    grad_out: Tensor, x: Tensor, channel_weight: Tensor, channel_bias: Tensor, spatial_weight: Tensor,
    spatial_bias: Tensor,
):
    """Gradients of `adaptive_mix_reference` w.r.t. its five inputs, recomputing the forward.

    grad_out (B, N, P, C) -> grads shaped like (x, channel_weight, channel_bias, spatial_weight, spatial_bias).
    """
    B, N, P, C = x.shape
    xf = x.reshape(B * N, P, C)
    mc = channel_weight.reshape(B * N, C, C)
    ms = spatial_weight.reshape(B * N, P, P)
    h_pre = torch.baddbmm(channel_bias.view(1, 1, C), xf, mc)  # (BN, P, C)
    h = F.gelu(h_pre)
    o_pre = torch.baddbmm(spatial_bias.view(1, P, 1), ms, h)
    g_o = torch.ops.aten.gelu_backward(grad_out.reshape(B * N, P, C), o_pre)
    g_ms = torch.bmm(g_o, h.transpose(1, 2))  # (BN, P_out, P_in)
    g_sb = g_o.sum(dim=(0, 2))
    g_h = torch.ops.aten.gelu_backward(torch.bmm(ms.transpose(1, 2), g_o), h_pre)
    g_mc = torch.bmm(xf.transpose(1, 2), g_h)  # (BN, C_in, C_out)
    g_cb = g_h.sum(dim=(0, 1))
    g_x = torch.bmm(g_h, mc.transpose(1, 2))
    return (
        g_x.view(B, N, P, C),
        g_mc.view(B, N, C, C),
        g_cb,
        g_ms.view(B, N, P, P),
        g_sb,
    )


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _gelu(x):
    """Exact (erf) GELU, F.gelu's default."""
    return 0.5 * x * (1 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    """d GELU(x) / dx = Phi(x) + x * phi(x)."""
    return 0.5 * (1 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def adaptive_mix_fwd_kernel(
    p_x, p_mc, p_bc, p_ms, p_bs, p_o,
    N, P, C,
    s_xb, s_xn, s_xp, s_xc,
    s_mcb, s_mcn, s_mci, s_mco,
    s_bc,
    s_msb, s_msn, s_mso, s_msi,
    s_bs,
    COMPUTE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    """One program per token, holding its padded (BLOCK_P, BLOCK_C) tile of x and its
    (BLOCK_P, BLOCK_P) spatial weight, looping over output channels in blocks of BLOCK_CO:
    both GEMMs split along the output channels, since out[:, j] = GELU(Ms @ h[:, j] + bs)
    needs only h[:, j] = GELU(x @ Mc[:, j] + bc[j]).

    x (B, N, P, C), Mc (B, N, C, C), bc (C,), Ms (B, N, P, P), bs (P,), all strided
    -> out (B, N, P, C) contiguous.
    """
    i_t = tl.program_id(0).to(tl.int64)
    i_b = i_t // N
    i_n = i_t % N
    o_p = tl.arange(0, BLOCK_P)
    o_c = tl.arange(0, BLOCK_C)
    m_p = o_p < P
    m_c = o_c < C
    p_xt = p_x + i_b * s_xb + i_n * s_xn
    b_x = tl.load(p_xt + o_p[:, None] * s_xp + o_c[None, :] * s_xc, mask=m_p[:, None] & m_c[None, :],
                  other=0).to(COMPUTE)
    p_mst = p_ms + i_b * s_msb + i_n * s_msn
    b_ms = tl.load(p_mst + o_p[:, None] * s_mso + o_p[None, :] * s_msi, mask=m_p[:, None] & m_p[None, :],
                   other=0).to(COMPUTE)
    b_bs = tl.load(p_bs + o_p * s_bs, mask=m_p, other=0).to(COMPUTE)
    p_mct = p_mc + i_b * s_mcb + i_n * s_mcn
    p_ot = p_o + i_t * P * C
    for i_co in range(0, C, BLOCK_CO):
        o_co = i_co + tl.arange(0, BLOCK_CO)
        m_co = o_co < C
        b_mc = tl.load(p_mct + o_c[:, None] * s_mci + o_co[None, :] * s_mco, mask=m_c[:, None] & m_co[None, :],
                       other=0).to(COMPUTE)
        b_bc = tl.load(p_bc + o_co * s_bc, mask=m_co, other=0).to(COMPUTE)
        b_h = _gelu(tl.dot(b_x, b_mc, input_precision=DOT_PRECISION) + b_bc[None, :])
        # padded rows p >= P hold GELU(x @ Mc + bias) = GELU(bias) != 0: zero them so the spatial mix
        # does not depend on Ms's padded columns being zero
        b_h = tl.where(m_p[:, None] & m_co[None, :], b_h, 0)
        b_o = _gelu(tl.dot(b_ms, b_h, input_precision=DOT_PRECISION) + b_bs[:, None])
        tl.store(p_ot + o_p[:, None] * C + o_co[None, :], b_o.to(p_o.dtype.element_ty),
                 mask=m_p[:, None] & m_co[None, :])


@triton.jit
def adaptive_mix_bwd_kernel(
    p_do, p_x, p_mc, p_bc, p_ms, p_bs,
    p_dx, p_dmc, p_dbc, p_dms, p_dbs,
    N, P, C,
    s_gb, s_gn, s_gp, s_gc,
    s_xb, s_xn, s_xp, s_xc,
    s_mcb, s_mcn, s_mci, s_mco,
    s_bc,
    s_msb, s_msn, s_mso, s_msi,
    s_bs,
    COMPUTE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CO: tl.constexpr,
):
    """Same grid and channel blocking as the forward; recomputes h and the pre-activations
    instead of saving them. Writes contiguous dx (B, N, P, C), dMc (B, N, C, C), dMs (B, N, P, P)
    and per-token bias partials dbc (B*N, C), dbs (B*N, P) that the host sums (deterministic,
    no atomics).
    """
    i_t = tl.program_id(0).to(tl.int64)
    i_b = i_t // N
    i_n = i_t % N
    o_p = tl.arange(0, BLOCK_P)
    o_c = tl.arange(0, BLOCK_C)
    m_p = o_p < P
    m_c = o_c < C
    m_pc = m_p[:, None] & m_c[None, :]
    m_pp = m_p[:, None] & m_p[None, :]
    p_xt = p_x + i_b * s_xb + i_n * s_xn
    b_x = tl.load(p_xt + o_p[:, None] * s_xp + o_c[None, :] * s_xc, mask=m_pc, other=0).to(COMPUTE)
    p_mst = p_ms + i_b * s_msb + i_n * s_msn
    b_ms = tl.load(p_mst + o_p[:, None] * s_mso + o_p[None, :] * s_msi, mask=m_pp, other=0).to(COMPUTE)
    b_bs = tl.load(p_bs + o_p * s_bs, mask=m_p, other=0).to(COMPUTE)
    p_mct = p_mc + i_b * s_mcb + i_n * s_mcn
    p_gt = p_do + i_b * s_gb + i_n * s_gn
    p_dmct = p_dmc + i_t * C * C
    b_dx = tl.zeros([BLOCK_P, BLOCK_C], dtype=COMPUTE)
    b_dms = tl.zeros([BLOCK_P, BLOCK_P], dtype=COMPUTE)
    b_dbs = tl.zeros([BLOCK_P], dtype=COMPUTE)
    for i_co in range(0, C, BLOCK_CO):
        o_co = i_co + tl.arange(0, BLOCK_CO)
        m_co = o_co < C
        m_pco = m_p[:, None] & m_co[None, :]
        m_cco = m_c[:, None] & m_co[None, :]
        b_mc = tl.load(p_mct + o_c[:, None] * s_mci + o_co[None, :] * s_mco, mask=m_cco, other=0).to(COMPUTE)
        b_bc = tl.load(p_bc + o_co * s_bc, mask=m_co, other=0).to(COMPUTE)
        b_hpre = tl.dot(b_x, b_mc, input_precision=DOT_PRECISION) + b_bc[None, :]
        b_h = tl.where(m_pco, _gelu(b_hpre), 0)
        b_opre = tl.dot(b_ms, b_h, input_precision=DOT_PRECISION) + b_bs[:, None]
        b_g = tl.load(p_gt + o_p[:, None] * s_gp + o_co[None, :] * s_gc, mask=m_pco, other=0).to(COMPUTE)
        b_go = b_g * _gelu_grad(b_opre)
        # spatial GEMM: dMs += dO h^T, dbs += rowsum(dO), dh = Ms^T dO
        b_dms += tl.dot(b_go, tl.trans(b_h), input_precision=DOT_PRECISION)
        b_dbs += tl.sum(b_go, axis=1)
        b_dh = tl.dot(tl.trans(b_ms), b_go, input_precision=DOT_PRECISION)
        b_dhpre = tl.where(m_pco, b_dh * _gelu_grad(b_hpre), 0)
        # channel GEMM: dMc[:, j] = x^T dH_j, dbc[j] = colsum(dH_j), dx += dH_j Mc[:, j]^T
        b_dmc = tl.dot(tl.trans(b_x), b_dhpre, input_precision=DOT_PRECISION)
        tl.store(p_dmct + o_c[:, None] * C + o_co[None, :], b_dmc.to(p_dmc.dtype.element_ty), mask=m_cco)
        tl.store(p_dbc + i_t * C + o_co, tl.sum(b_dhpre, axis=0).to(p_dbc.dtype.element_ty), mask=m_co)
        b_dx += tl.dot(b_dhpre, tl.trans(b_mc), input_precision=DOT_PRECISION)
    tl.store(p_dx + i_t * P * C + o_p[:, None] * C + o_c[None, :], b_dx.to(p_dx.dtype.element_ty), mask=m_pc)
    tl.store(p_dms + i_t * P * P + o_p[:, None] * P + o_p[None, :], b_dms.to(p_dms.dtype.element_ty), mask=m_pp)
    tl.store(p_dbs + i_t * P + o_p, b_dbs.to(p_dbs.dtype.element_ty), mask=m_p)


# ----------------------------------------------------------------------------- host wrappers
def _launch_config(x: Tensor) -> dict:
    """Constexprs and launch options shared by the forward and backward kernels.

    P and C are padded to powers of two (tl.arange) and to >= 16, the smallest K that 16-bit and
    fp32 dots accept on GPU; output channels go 16 at a time. Chosen from the ptxas statistics of
    `TRITON_INTERPRET=0 python -m kernels.aot` (sm_90 build, triton 3.6; no GPU timings yet): at
    P = 36, C = 96 the bf16/fp16 kernels use <= 255 registers without spills and <= 119 KB of
    shared memory with 8 warps; fp64 needs num_stages=1 to keep the backward under the H100's
    227 KB; fp32 with IEEE dots spills in the backward (TF32 does not).
    """
    P, C = x.shape[2:]
    compute = _backend.compute_dtype(x)
    return dict(
        COMPUTE=compute,
        DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_P=max(16, triton.next_power_of_2(P)),
        BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_CO=16,
        num_warps=8,
        num_stages=1 if compute == tl.float64 else 3,
    )


def _dot_precision(dtype: torch.dtype) -> str:
    """fp64: exact fp64 dots. fp16/bf16: TF32, exact on the 16-bit operands and finer than the
    16-bit intermediates of the reference chain. fp32: torch's own knob, so fp32 stays IEEE
    unless the user opted into TF32 with torch.set_float32_matmul_precision("high"/"medium")."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def adaptive_mix_fwd(x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend: str) -> Tensor:
    """x (B, N, P, C), channel_weight (B, N, C, C), channel_bias (C,), spatial_weight (B, N, P, P),
    spatial_bias (P,) -> (B, N, P, C) contiguous."""
    if backend != "triton":
        return adaptive_mix_reference(x, channel_weight, channel_bias, spatial_weight, spatial_bias).contiguous()
    B, N, P, C = x.shape
    out = _backend.empty_output((B, N, P, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    adaptive_mix_fwd_kernel[(B * N,)](
        x, channel_weight, channel_bias, spatial_weight, spatial_bias, out,
        N, P, C,
        *x.stride(), *channel_weight.stride(), *channel_bias.stride(), *spatial_weight.stride(),
        *spatial_bias.stride(),
        **_launch_config(x),
    )
    return out


def adaptive_mix_bwd(grad_out, x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend: str):
    """grad_out (B, N, P, C) -> contiguous grads shaped like (x, channel_weight, channel_bias,
    spatial_weight, spatial_bias), in the inputs' dtype."""
    if backend != "triton":
        grads = adaptive_mix_reference_backward(grad_out, x, channel_weight, channel_bias, spatial_weight,
                                                spatial_bias)
        return tuple(g.contiguous() for g in grads)
    B, N, P, C = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    dx = _backend.empty_output((B, N, P, C), dtype=x.dtype, device=dev)
    dmc = _backend.empty_output((B, N, C, C), dtype=x.dtype, device=dev)
    dms = _backend.empty_output((B, N, P, P), dtype=x.dtype, device=dev)
    # per-token bias partials in the accumulation dtype, summed over tokens below
    dbc = _backend.empty_output((B * N, C), dtype=acc, device=dev)
    dbs = _backend.empty_output((B * N, P), dtype=acc, device=dev)
    if B * N > 0 and P * C > 0:
        adaptive_mix_bwd_kernel[(B * N,)](
            grad_out, x, channel_weight, channel_bias, spatial_weight, spatial_bias,
            dx, dmc, dbc, dms, dbs,
            N, P, C,
            *grad_out.stride(), *x.stride(), *channel_weight.stride(), *channel_bias.stride(),
            *spatial_weight.stride(), *spatial_bias.stride(),
            **_launch_config(x),
        )
    return dx, dmc, dbc.sum(0).to(x.dtype), dms, dbs.sum(0).to(x.dtype)


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("sparseformer::adaptive_mix", mutates_args=())
def _adaptive_mix_op(
    x: Tensor, channel_weight: Tensor, channel_bias: Tensor, spatial_weight: Tensor, spatial_bias: Tensor, backend: str
) -> Tensor:
    return adaptive_mix_fwd(x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend)


@_adaptive_mix_op.register_fake
def _(x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("sparseformer::adaptive_mix_backward", mutates_args=())
def _adaptive_mix_backward_op(
    grad_out: Tensor,
    x: Tensor,
    channel_weight: Tensor,
    channel_bias: Tensor,
    spatial_weight: Tensor,
    spatial_bias: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = adaptive_mix_bwd(grad_out, x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend)
    return tuple(grads)


@_adaptive_mix_backward_op.register_fake
def _(grad_out, x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend):
    return tuple(t.new_empty(t.shape) for t in (x, channel_weight, channel_bias, spatial_weight, spatial_bias))


def _setup_context(ctx, inputs, output):
    *tensors, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _backward(ctx, grad_out):
    grads = _adaptive_mix_backward_op(grad_out.contiguous(), *ctx.saved_tensors, ctx.backend)
    return (*grads, None)


_adaptive_mix_op.register_autograd(_backward, setup_context=_setup_context)


def _mix_flops(B: int, N: int, P: int, C: int) -> int:
    """FLOPs (2 x MACs) of the two per-token GEMMs: (P x C)(C x C) and (P x P)(P x C)."""
    return 2 * B * N * (P * C * C + P * P * C)


@register_flop_formula(torch.ops.sparseformer.adaptive_mix)
def _adaptive_mix_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return _mix_flops(*x_shape)


@register_flop_formula(torch.ops.sparseformer.adaptive_mix_backward)
def _adaptive_mix_backward_flops(grad_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _mix_flops(*grad_shape)  # each GEMM's backward is two GEMMs of its size


# ----------------------------------------------------------------------------- public function
def adaptive_mix(
    x: Tensor,
    channel_weight: Tensor,
    channel_bias: Tensor,
    spatial_weight: Tensor,
    spatial_bias: Tensor,
    *,
    backend: str = "auto",
) -> Tensor:
    """GELU(spatial_weight @ GELU(x @ channel_weight + channel_bias) + spatial_bias[:, None]).

    Args:
        x: (B, N, P, C) sampled features of each token.
        channel_weight: (B, N, C, C) per-token channel mixing, read as (C_in, C_out).
        channel_bias: (C,).
        spatial_weight: (B, N, P, P) per-token spatial mixing, read as (P_out, P_in).
        spatial_bias: (P,).
        backend: "auto" (Triton on CUDA, reference otherwise), "triton" or "torch".
    Returns:
        (B, N, P, C) in the inputs' dtype (all five must share one dtype).
    """
    args = dict(
        x=x,
        channel_weight=channel_weight,
        channel_bias=channel_bias,
        spatial_weight=spatial_weight,
        spatial_bias=spatial_bias,
    )
    check_inputs("adaptive_mix", **args)
    check_same_dtype("adaptive_mix", **args)
    if x.dim() != 4:
        raise ValueError(f"adaptive_mix: x must be (B, N, P, C), got shape {tuple(x.shape)}")
    B, N, P, C = x.shape
    expected = {
        "channel_weight": (B, N, C, C),
        "channel_bias": (C,),
        "spatial_weight": (B, N, P, P),
        "spatial_bias": (P,),
    }
    for name, shape in expected.items():
        if tuple(args[name].shape) != shape:
            raise ValueError(
                f"adaptive_mix: {name} must have shape {shape} for x of shape {tuple(x.shape)}, "
                f"got {tuple(args[name].shape)}"
            )
    return _adaptive_mix_op(x, channel_weight, channel_bias, spatial_weight, spatial_bias,
                            resolve_backend(backend, x.device))
