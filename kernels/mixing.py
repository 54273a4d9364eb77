"""Adaptive mixing: per-token dynamic channel and spatial GEMMs (AdaMixer-style, one group).

For every token (b, n), with x its (P, C) sampled features and `params` the token's generator
output (C*C + P*P values: Mc = params[:C*C] read as (C_in, C_out), Ms = params[C*C:] read as
(P_out, P_in); docs/MODEL.md, "Adaptive mixing"):
    h   = GELU(x @ Mc + beta_c)          beta_c: (C,)
    out = GELU(Ms @ h + beta_s[:, None]) beta_s: (P,)

The op takes the generator output whole and its backward writes one gradient of it, so the
model never splits or concatenates the 10,512-wide generator output of SparseFormer-T.

Kernel design (docs/KERNELS.md, "Mixing"): one program per token; the P rows are held as a
power-of-two block A plus an optional block B (P = 36 -> 32 + 16, not 64: 1.8x fewer padded
FLOPs), both GEMMs split along output-channel blocks of BLOCK_CO (out[:, j] needs only
h[:, j]); 16-bit tiles go straight to `tl.dot` on GPU. The `@triton.jit` helpers `_mix_forward` /
`_mix_backward` are shared with the fused sample+mix kernel (kernels/fused.py).

Layout of this module: reference -> Triton helpers and kernels -> launch configuration and host
wrappers -> torch.library ops (+ FLOP formula, autograd) -> public function.
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
def split_params(params: Tensor, P: int, C: int) -> tuple[Tensor, Tensor]:
    """params (B, N, C*C + P*P) -> Mc (B*N, C_in, C_out), Ms (B*N, P_out, P_in), views."""
    B, N, _ = params.shape
    flat = params.reshape(B * N, C * C + P * P)
    return flat[:, : C * C].view(B * N, C, C), flat[:, C * C :].view(B * N, P, P)


def adaptive_mix_reference(x: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor) -> Tensor:
    """The authors' baddbmm chain, in the inputs' dtype.

    x (B, N, P, C), params (B, N, C*C + P*P), channel_bias (C,), spatial_bias (P,) -> (B, N, P, C).
    """
    B, N, P, C = x.shape
    mc, ms = split_params(params, P, C)
    h = F.gelu(torch.baddbmm(channel_bias.view(1, 1, C), x.reshape(B * N, P, C), mc))
    out = torch.baddbmm(spatial_bias.view(1, P, 1), ms, h)
    return F.gelu(out).view(B, N, P, C)


def adaptive_mix_reference_backward(grad_out: Tensor, x: Tensor, params: Tensor, channel_bias: Tensor,
                                    spatial_bias: Tensor):
    """Gradients of `adaptive_mix_reference` w.r.t. its four inputs, recomputing the forward.

    grad_out (B, N, P, C) -> grads shaped like (x, params, channel_bias, spatial_bias).
    """
    B, N, P, C = x.shape
    xf = x.reshape(B * N, P, C)
    mc, ms = split_params(params, P, C)
    h_pre = torch.baddbmm(channel_bias.view(1, 1, C), xf, mc)  # (BN, P, C)
    h = F.gelu(h_pre)
    o_pre = torch.baddbmm(spatial_bias.view(1, P, 1), ms, h)
    g_o = torch.ops.aten.gelu_backward(grad_out.reshape(B * N, P, C), o_pre)
    g_ms = torch.bmm(g_o, h.transpose(1, 2))  # (BN, P_out, P_in)
    g_h = torch.ops.aten.gelu_backward(torch.bmm(ms.transpose(1, 2), g_o), h_pre)
    g_mc = torch.bmm(xf.transpose(1, 2), g_h)  # (BN, C_in, C_out)
    g_x = torch.bmm(g_h, mc.transpose(1, 2))
    g_params = torch.cat([g_mc.flatten(1), g_ms.flatten(1)], dim=1).view(B, N, C * C + P * P)
    return g_x.view(B, N, P, C), g_params, g_h.sum(dim=(0, 1)), g_o.sum(dim=(0, 2))


# ----------------------------------------------------------------------------- Triton helpers
@triton.jit
def _gelu(x):
    """Exact (erf) GELU, F.gelu's default."""
    return 0.5 * x * (1 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    """d GELU(x) / dx = Phi(x) + x * phi(x)."""
    return 0.5 * (1 + tl.math.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)


@triton.jit
def _ms_tile(p_ms, P, s_k, o_r, m_r, o_k, m_k, DOT: tl.constexpr):
    """Rows o_r, columns o_k of the token's (P_out, P_in) spatial weight, row-major at p_ms."""
    return tl.load(p_ms + (o_r[:, None] * P + o_k[None, :]) * s_k, mask=m_r[:, None] & m_k[None, :],
                   other=0).to(DOT)


@triton.jit
def _mix_forward(
    b_xa, b_xb, p_prm, s_k, p_bc, s_bc, p_bs, s_bs, p_o, s_op, s_oc, P, C,
    ACC: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PA: tl.constexpr, PB: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """One token's mix of x = [x_a; x_b] (row blocks (PA, BLOCK_C) and (PB, BLOCK_C), zero-padded,
    in the dot dtype), stored to p_o (strides s_op, s_oc). params at p_prm with stride s_k."""
    o_a = tl.arange(0, PA)
    m_a = o_a < P
    o_b = PA + tl.arange(0, PB)
    m_b = o_b < P
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    p_ms = p_prm + C * C * s_k
    b_msaa = _ms_tile(p_ms, P, s_k, o_a, m_a, o_a, m_a, DOT)
    b_bsa = tl.load(p_bs + o_a * s_bs, mask=m_a, other=0).to(ACC)
    if HAS_B:
        b_msab = _ms_tile(p_ms, P, s_k, o_a, m_a, o_b, m_b, DOT)
        b_msba = _ms_tile(p_ms, P, s_k, o_b, m_b, o_a, m_a, DOT)
        b_msbb = _ms_tile(p_ms, P, s_k, o_b, m_b, o_b, m_b, DOT)
        b_bsb = tl.load(p_bs + o_b * s_bs, mask=m_b, other=0).to(ACC)
    for i_co in range(0, C, BLOCK_CO):
        o_co = i_co + tl.arange(0, BLOCK_CO)
        m_co = o_co < C
        b_mc = tl.load(p_prm + (o_c[:, None] * C + o_co[None, :]) * s_k, mask=m_c[:, None] & m_co[None, :],
                       other=0).to(DOT)
        b_bc = tl.load(p_bc + o_co * s_bc, mask=m_co, other=0).to(ACC)
        # padded rows p >= P hold GELU(bias) != 0: zero them so the spatial mix never sees them
        b_ha = _gelu(tl.dot(b_xa, b_mc, input_precision=DOT_PRECISION, out_dtype=ACC) + b_bc[None, :])
        b_ha = tl.where(m_a[:, None] & m_co[None, :], b_ha, 0).to(DOT)
        b_oa = tl.dot(b_msaa, b_ha, input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_B:
            b_hb = _gelu(tl.dot(b_xb, b_mc, input_precision=DOT_PRECISION, out_dtype=ACC) + b_bc[None, :])
            b_hb = tl.where(m_b[:, None] & m_co[None, :], b_hb, 0).to(DOT)
            b_oa += tl.dot(b_msab, b_hb, input_precision=DOT_PRECISION, out_dtype=ACC)
            b_ob = tl.dot(b_msba, b_ha, input_precision=DOT_PRECISION, out_dtype=ACC)
            b_ob += tl.dot(b_msbb, b_hb, input_precision=DOT_PRECISION, out_dtype=ACC)
            b_ob = _gelu(b_ob + b_bsb[:, None])
            tl.store(p_o + o_b[:, None] * s_op + o_co[None, :] * s_oc, b_ob.to(p_o.dtype.element_ty),
                     mask=m_b[:, None] & m_co[None, :])
        b_oa = _gelu(b_oa + b_bsa[:, None])
        tl.store(p_o + o_a[:, None] * s_op + o_co[None, :] * s_oc, b_oa.to(p_o.dtype.element_ty),
                 mask=m_a[:, None] & m_co[None, :])


@triton.jit
def _mix_backward(
    b_xa, b_xb, p_prm, s_k, p_bc, s_bc, p_bs, s_bs, p_g, s_gp, s_gc, p_dprm, p_dbc, p_dbs, p_dh, P, C,
    ACC: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PA: tl.constexpr, PB: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Backward of `_mix_forward` for one token, recomputing h and the pre-activations. Writes the
    token's parameter gradient (contiguous C*C + P*P at p_dprm) and its bias partials (C at p_dbc,
    P at p_dbs; the host sums them over tokens: deterministic, no atomics), and leaves dH (the
    gradient at the channel GELU's input, in the dot dtype as the dot sees it) in the token's
    (P, C) scratch at p_dh, from which `_dx_block` forms the x gradient a channel block at a time:
    held in registers beside the spatial-weight gradient, the whole x gradient spills on every GPU."""
    o_a = tl.arange(0, PA)
    m_a = o_a < P
    o_b = PA + tl.arange(0, PB)
    m_b = o_b < P
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C
    p_ms = p_prm + C * C * s_k
    b_msaa = _ms_tile(p_ms, P, s_k, o_a, m_a, o_a, m_a, DOT)
    b_bsa = tl.load(p_bs + o_a * s_bs, mask=m_a, other=0).to(ACC)
    b_dmsaa = tl.zeros([PA, PA], dtype=ACC)
    b_dbsa = tl.zeros([PA], dtype=ACC)
    if HAS_B:
        b_msab = _ms_tile(p_ms, P, s_k, o_a, m_a, o_b, m_b, DOT)
        b_msba = _ms_tile(p_ms, P, s_k, o_b, m_b, o_a, m_a, DOT)
        b_msbb = _ms_tile(p_ms, P, s_k, o_b, m_b, o_b, m_b, DOT)
        b_bsb = tl.load(p_bs + o_b * s_bs, mask=m_b, other=0).to(ACC)
        b_dmsab = tl.zeros([PA, PB], dtype=ACC)
        b_dmsba = tl.zeros([PB, PA], dtype=ACC)
        b_dmsbb = tl.zeros([PB, PB], dtype=ACC)
        b_dbsb = tl.zeros([PB], dtype=ACC)
    for i_co in range(0, C, BLOCK_CO):
        o_co = i_co + tl.arange(0, BLOCK_CO)
        m_co = o_co < C
        m_aco = m_a[:, None] & m_co[None, :]
        b_mc = tl.load(p_prm + (o_c[:, None] * C + o_co[None, :]) * s_k, mask=m_c[:, None] & m_co[None, :],
                       other=0).to(DOT)
        b_bc = tl.load(p_bc + o_co * s_bc, mask=m_co, other=0).to(ACC)
        # recompute: h = GELU(x Mc + bc), o_pre = Ms h + bs
        b_hpa = tl.dot(b_xa, b_mc, input_precision=DOT_PRECISION, out_dtype=ACC) + b_bc[None, :]
        b_ha = tl.where(m_aco, _gelu(b_hpa), 0).to(DOT)
        b_opa = tl.dot(b_msaa, b_ha, input_precision=DOT_PRECISION, out_dtype=ACC) + b_bsa[:, None]
        if HAS_B:
            m_bco = m_b[:, None] & m_co[None, :]
            b_hpb = tl.dot(b_xb, b_mc, input_precision=DOT_PRECISION, out_dtype=ACC) + b_bc[None, :]
            b_hb = tl.where(m_bco, _gelu(b_hpb), 0).to(DOT)
            b_opa += tl.dot(b_msab, b_hb, input_precision=DOT_PRECISION, out_dtype=ACC)
            b_opb = tl.dot(b_msba, b_ha, input_precision=DOT_PRECISION, out_dtype=ACC) + b_bsb[:, None]
            b_opb += tl.dot(b_msbb, b_hb, input_precision=DOT_PRECISION, out_dtype=ACC)
        # spatial GEMM: dMs += dO h^T, dbs += rowsum(dO), dh = Ms^T dO
        b_ga = tl.load(p_g + o_a[:, None] * s_gp + o_co[None, :] * s_gc, mask=m_aco, other=0).to(ACC)
        b_goa = b_ga * _gelu_grad(b_opa)
        b_dbsa += tl.sum(b_goa, axis=1)
        b_goa = b_goa.to(DOT)
        b_dmsaa += tl.dot(b_goa, tl.trans(b_ha), input_precision=DOT_PRECISION, out_dtype=ACC)
        b_dha = tl.dot(tl.trans(b_msaa), b_goa, input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_B:
            b_gb = tl.load(p_g + o_b[:, None] * s_gp + o_co[None, :] * s_gc, mask=m_bco, other=0).to(ACC)
            b_gob = b_gb * _gelu_grad(b_opb)
            b_dbsb += tl.sum(b_gob, axis=1)
            b_gob = b_gob.to(DOT)
            b_dmsab += tl.dot(b_goa, tl.trans(b_hb), input_precision=DOT_PRECISION, out_dtype=ACC)
            b_dmsba += tl.dot(b_gob, tl.trans(b_ha), input_precision=DOT_PRECISION, out_dtype=ACC)
            b_dmsbb += tl.dot(b_gob, tl.trans(b_hb), input_precision=DOT_PRECISION, out_dtype=ACC)
            b_dha += tl.dot(tl.trans(b_msba), b_gob, input_precision=DOT_PRECISION, out_dtype=ACC)
            b_dhb = tl.dot(tl.trans(b_msab), b_goa, input_precision=DOT_PRECISION, out_dtype=ACC)
            b_dhb += tl.dot(tl.trans(b_msbb), b_gob, input_precision=DOT_PRECISION, out_dtype=ACC)
        # channel GEMM: dMc[:, j] = x^T dH_j, dbc[j] = colsum(dH_j), dx += dH_j Mc[:, j]^T
        b_dhpa = tl.where(m_aco, b_dha * _gelu_grad(b_hpa), 0)
        b_dbc = tl.sum(b_dhpa, axis=0)
        b_dhpa = b_dhpa.to(DOT)
        tl.store(p_dh + o_a[:, None] * C + o_co[None, :], b_dhpa, mask=m_aco)
        if HAS_B:
            b_dhpb = tl.where(m_bco, b_dhb * _gelu_grad(b_hpb), 0)
            b_dbc += tl.sum(b_dhpb, axis=0)
            tl.store(p_dh + o_b[:, None] * C + o_co[None, :], b_dhpb.to(DOT), mask=m_bco)
        tl.store(p_dbc + o_co, b_dbc.to(p_dbc.dtype.element_ty), mask=m_co)
    p_dms = p_dprm + C * C
    tl.store(p_dms + o_a[:, None] * P + o_a[None, :], b_dmsaa.to(p_dprm.dtype.element_ty),
             mask=m_a[:, None] & m_a[None, :])
    tl.store(p_dbs + o_a, b_dbsa.to(p_dbs.dtype.element_ty), mask=m_a)
    if HAS_B:
        tl.store(p_dms + o_a[:, None] * P + o_b[None, :], b_dmsab.to(p_dprm.dtype.element_ty),
                 mask=m_a[:, None] & m_b[None, :])
        tl.store(p_dms + o_b[:, None] * P + o_a[None, :], b_dmsba.to(p_dprm.dtype.element_ty),
                 mask=m_b[:, None] & m_a[None, :])
        tl.store(p_dms + o_b[:, None] * P + o_b[None, :], b_dmsbb.to(p_dprm.dtype.element_ty),
                 mask=m_b[:, None] & m_b[None, :])
        tl.store(p_dbs + o_b, b_dbsb.to(p_dbs.dtype.element_ty), mask=m_b)
    tl.debug_barrier()  # the scratch was written by other threads of this program: make it visible
    # dMc[:, j] = x^T dH_j in a second pass: x is needed transposed here, and holding it in both
    # dot-operand layouts through the first pass spills
    for i_co in range(0, C, BLOCK_CO):
        o_co = i_co + tl.arange(0, BLOCK_CO)
        m_co = o_co < C
        b_dha = tl.load(p_dh + o_a[:, None] * C + o_co[None, :], mask=m_a[:, None] & m_co[None, :], other=0)
        b_dmc = tl.dot(tl.trans(b_xa), b_dha.to(DOT), input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_B:
            b_dhb = tl.load(p_dh + o_b[:, None] * C + o_co[None, :], mask=m_b[:, None] & m_co[None, :], other=0)
            b_dmc += tl.dot(tl.trans(b_xb), b_dhb.to(DOT), input_precision=DOT_PRECISION, out_dtype=ACC)
        tl.store(p_dprm + o_c[:, None] * C + o_co[None, :], b_dmc.to(p_dprm.dtype.element_ty),
                 mask=m_c[:, None] & m_co[None, :])


@triton.jit
def _dx_block(
    p_dh, p_prm, s_k, row0, k0, P, C,
    ACC: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """Rows row0 .. row0 + ROWS, columns k0 .. k0 + BLOCK_K of the x gradient, dx = sum_j dH_j Mc[:, j]^T,
    from the dH that `_mix_backward` left at p_dh, as a (ROWS, BLOCK_K) tile in ACC. A block at a
    time, so the caller consumes dx (stores it, or turns it into the sampling gradient) without
    ever holding all of it."""
    o_r = row0 + tl.arange(0, ROWS)
    m_r = o_r < P
    o_k = k0 + tl.arange(0, BLOCK_K)
    m_k = o_k < C
    b_dx = tl.zeros([ROWS, BLOCK_K], dtype=ACC)
    for i_co in range(0, C, BLOCK_CO):
        o_co = i_co + tl.arange(0, BLOCK_CO)
        m_co = o_co < C
        b_mc = tl.load(p_prm + (o_k[:, None] * C + o_co[None, :]) * s_k, mask=m_k[:, None] & m_co[None, :],
                       other=0).to(DOT)
        b_dh = tl.load(p_dh + o_r[:, None] * C + o_co[None, :], mask=m_r[:, None] & m_co[None, :], other=0)
        b_dx += tl.dot(b_dh.to(DOT), tl.trans(b_mc), input_precision=DOT_PRECISION, out_dtype=ACC)
    return b_dx


@triton.jit
def _load_x(p_xt, s_xp, s_xc, P, C, PA: tl.constexpr, PB: tl.constexpr, BLOCK_C: tl.constexpr,
            DOT: tl.constexpr):
    """A token's (P, C) tile as zero-padded row blocks (PA, BLOCK_C), (PB, BLOCK_C) in the dot dtype."""
    o_c = tl.arange(0, BLOCK_C)
    o_a = tl.arange(0, PA)
    o_b = PA + tl.arange(0, PB)
    m_c = o_c[None, :] < C
    b_xa = tl.load(p_xt + o_a[:, None] * s_xp + o_c[None, :] * s_xc, mask=(o_a[:, None] < P) & m_c, other=0)
    b_xb = tl.load(p_xt + o_b[:, None] * s_xp + o_c[None, :] * s_xc, mask=(o_b[:, None] < P) & m_c, other=0)
    return b_xa.to(DOT), b_xb.to(DOT)


@triton.jit
def adaptive_mix_fwd_kernel(
    p_x, p_prm, p_bc, p_bs, p_o,
    N, P, C,
    s_xb, s_xn, s_xp, s_xc,
    s_pb, s_pn, s_pk,
    s_bc, s_bs,
    ACC: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PA: tl.constexpr, PB: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per token. x (B, N, P, C), params (B, N, C*C + P*P), biases, all strided ->
    out (B, N, P, C) contiguous."""
    i_t = tl.program_id(0).to(tl.int64)
    i_b = i_t // N
    i_n = i_t % N
    b_xa, b_xb = _load_x(p_x + i_b * s_xb + i_n * s_xn, s_xp, s_xc, P, C, PA, PB, BLOCK_C, DOT)
    _mix_forward(b_xa, b_xb, p_prm + i_b * s_pb + i_n * s_pn, s_pk, p_bc, s_bc, p_bs, s_bs, p_o + i_t * P * C, C, 1,
                 P, C, ACC, DOT, DOT_PRECISION, PA, PB, HAS_B, BLOCK_C, BLOCK_CO)


@triton.jit
def adaptive_mix_bwd_kernel(
    p_do, p_x, p_prm, p_bc, p_bs,
    p_dx, p_dprm, p_dbc, p_dbs, p_dh,
    N, P, C,
    s_gb, s_gn, s_gp, s_gc,
    s_xb, s_xn, s_xp, s_xc,
    s_pb, s_pn, s_pk,
    s_bc, s_bs,
    ACC: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PA: tl.constexpr, PB: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Same grid as the forward. Writes contiguous dx (B, N, P, C), dparams (B, N, C*C + P*P) and
    per-token bias partials dbc (B*N, C), dbs (B*N, P); dh is a (B*N, P, C) scratch."""
    i_t = tl.program_id(0).to(tl.int64)
    i_b = i_t // N
    i_n = i_t % N
    b_xa, b_xb = _load_x(p_x + i_b * s_xb + i_n * s_xn, s_xp, s_xc, P, C, PA, PB, BLOCK_C, DOT)
    p_prmt = p_prm + i_b * s_pb + i_n * s_pn
    p_dht = p_dh + i_t * P * C
    _mix_backward(
        b_xa, b_xb, p_prmt, s_pk, p_bc, s_bc, p_bs, s_bs,
        p_do + i_b * s_gb + i_n * s_gn, s_gp, s_gc, p_dprm + i_t * (C * C + P * P), p_dbc + i_t * C, p_dbs + i_t * P,
        p_dht, P, C, ACC, DOT, DOT_PRECISION, PA, PB, HAS_B, BLOCK_C, BLOCK_CO)
    p_dxt = p_dx + i_t * P * C
    _store_dx_rows(p_dxt, p_dht, p_prmt, s_pk, 0, P, C, ACC, DOT, DOT_PRECISION, PA, BLOCK_K, BLOCK_CO)
    if HAS_B:
        _store_dx_rows(p_dxt, p_dht, p_prmt, s_pk, PA, P, C, ACC, DOT, DOT_PRECISION, PB, BLOCK_K, BLOCK_CO)


@triton.jit
def _store_dx_rows(p_dxt, p_dht, p_prmt, s_pk, row0, P, C, ACC: tl.constexpr, DOT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Rows row0 .. row0 + ROWS of one token's x gradient, stored a channel block at a time."""
    o_r = row0 + tl.arange(0, ROWS)
    for k0 in range(0, C, BLOCK_K):
        b_dx = _dx_block(p_dht, p_prmt, s_pk, row0, k0, P, C, ACC, DOT, DOT_PRECISION, ROWS, BLOCK_K, BLOCK_CO)
        o_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(p_dxt + o_r[:, None] * C + o_k[None, :], b_dx.to(p_dxt.dtype.element_ty),
                 mask=(o_r[:, None] < P) & (o_k[None, :] < C))


# ----------------------------------------------------------------------------- launch configuration
def row_blocks(P: int) -> tuple[int, int]:
    """(PA, PB): P padded to a multiple of 16 (the smallest dot dimension on GPU) and split into a
    power of two PA plus the power of two PB >= 16 that covers the rest (0 if none): 36 -> 32 + 16,
    81 -> 64 + 32, 16 -> 16 + 0, 49 -> 64 + 0."""
    p16 = max(16, -(-P // 16) * 16)
    pa = triton.next_power_of_2(p16)
    if pa != p16:
        pa //= 2
    rest = p16 - pa
    return pa, (triton.next_power_of_2(rest) if rest else 0)


def padded_mix_flops(P: int, C: int) -> tuple[int, int]:
    """(useful, executed) multiply-adds of one token's forward mix with `mix_config`'s blocking:
    the channel GEMM runs (PA + PB) x BLOCK_C x C_out-blocks, the spatial GEMM (PA + PB)^2 x ..."""
    pa, pb = row_blocks(P)
    rows = pa + pb
    block_c = max(16, triton.next_power_of_2(C))
    block_co = min(32, block_c)
    cols = -(-C // block_co) * block_co
    return P * C * C + P * P * C, rows * block_c * cols + rows * rows * cols


def mix_config(P: int, C: int, dtype: torch.dtype, target: _backend.Target, backward: bool = False) -> dict:
    """Constexprs and launch options shared by the forward, backward and fused kernels.

    4 warps and 32-wide output-channel blocks keep a token's working set small enough for several
    tokens per SM; the backward (three passes, see `_mix_backward`; the fused epilogue a row block at
    a time) runs without pipelining, which keeps its 16-bit kernels within 255 registers without
    spilling on sm_80/86/89/90; 16-wide blocks and no pipelining where shared memory is tight
    (sm_86/sm_89: 99 KB per block) and for fp64. Checked for every arch by `python -m kernels.aot`
    (registers, spills, shared memory).
    """
    pa, pb = row_blocks(P)
    block_c = max(16, triton.next_power_of_2(C))
    compact = target.shared_bytes < 128 * 1024
    fp64 = dtype == torch.float64
    return dict(
        ACC=tl.float64 if fp64 else tl.float32,
        DOT=_backend.dot_dtype(dtype),
        DOT_PRECISION=_backend.dot_precision(dtype),
        PA=pa,
        PB=max(pb, 16),
        HAS_B=pb > 0,
        BLOCK_C=block_c,
        BLOCK_CO=min(16 if compact or fp64 else 32, block_c),
        BLOCK_K=min(32, block_c),
        num_warps=4,
        num_stages=1 if compact or fp64 or backward else 2,
    )


def mix_configs(P: int, C: int, dtype: torch.dtype, target: _backend.Target, backward: bool = False) -> list[dict]:
    """`mix_config` first, then configs that need less shared memory, for `_backend.launch` to take
    the first that fits (the tiles hold whole rows of P, so many sampling points can overflow a block:
    the fp32 backward at P = 81, C = 16 fits sm_80 only with the last, docs/KERNELS.md): 16-wide blocks
    without pipelining, then for fp32 IEEE dots (exact fp32 as 3xTF32 is, but an FMA loop: slower,
    spills) instead of 3xTF32, whose split operands double the staged tiles."""
    first = mix_config(P, C, dtype, target, backward)
    small = {**first, "BLOCK_CO": min(16, first["BLOCK_CO"]), "BLOCK_K": min(16, first["BLOCK_K"]), "num_stages": 1}
    ladder = [first, small, {**small, "DOT_PRECISION": "ieee"}]
    return [c for i, c in enumerate(ladder) if c not in ladder[:i]]


# ----------------------------------------------------------------------------- host wrappers
def check_mix_shapes(op: str, x: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be (B, N, P, C), got shape {tuple(x.shape)}")
    B, N, P, C = x.shape
    expected = {"params": (B, N, C * C + P * P), "channel_bias": (C,), "spatial_bias": (P,)}
    given = {"params": params, "channel_bias": channel_bias, "spatial_bias": spatial_bias}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape} for x of shape {tuple(x.shape)} "
                             f"(params: the generator's C*C + P*P outputs per token), got {tuple(given[name].shape)}")


def adaptive_mix_fwd(x: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor, backend: str) -> Tensor:
    """x (B, N, P, C), params (B, N, C*C + P*P), channel_bias (C,), spatial_bias (P,) -> (B, N, P, C) contiguous."""
    if backend != "triton":
        return adaptive_mix_reference(x, params, channel_bias, spatial_bias).contiguous()
    B, N, P, C = x.shape
    out = _backend.empty_output((B, N, P, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _backend.launch(adaptive_mix_fwd_kernel, (B * N,), (
        x, params, channel_bias, spatial_bias, out,
        N, P, C,
        *x.stride(), *params.stride(), *channel_bias.stride(), *spatial_bias.stride(),
    ), mix_configs(P, C, x.dtype, _backend.target(x.device)), x.device)
    return out


def backward_buffers(B: int, N: int, P: int, C: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token bias-gradient partials (B*N, C), (B*N, P) in the accumulation dtype, and the
    (B*N, P, C) scratch of `_mix_backward`'s two passes in the dot dtype (`dtype`, fp32 under the
    interpreter)."""
    acc = _backend.accumulate_dtype(dtype)
    scratch = dtype if _backend.dot_dtype(dtype) != tl.float32 or dtype == torch.float32 else torch.float32
    return (_backend.empty_output((B * N, C), dtype=acc, device=device),
            _backend.empty_output((B * N, P), dtype=acc, device=device),
            torch.empty((B * N, P, C), dtype=scratch, device=device))


def adaptive_mix_bwd(grad_out: Tensor, x: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor,
                     backend: str):
    """grad_out (B, N, P, C) -> contiguous grads shaped like (x, params, channel_bias, spatial_bias),
    in the inputs' dtype."""
    if backend != "triton":
        return tuple(g.contiguous() for g in adaptive_mix_reference_backward(grad_out, x, params, channel_bias,
                                                                             spatial_bias))
    B, N, P, C = x.shape
    dev = x.device
    dx = _backend.empty_output((B, N, P, C), dtype=x.dtype, device=dev)
    dparams = _backend.empty_output((B, N, C * C + P * P), dtype=params.dtype, device=dev)
    dbc, dbs, dh = backward_buffers(B, N, P, C, x.dtype, dev)
    if B * N > 0 and P * C > 0:
        _backend.launch(adaptive_mix_bwd_kernel, (B * N,), (
            grad_out, x, params, channel_bias, spatial_bias,
            dx, dparams, dbc, dbs, dh,
            N, P, C,
            *grad_out.stride(), *x.stride(), *params.stride(), *channel_bias.stride(), *spatial_bias.stride(),
        ), mix_configs(P, C, x.dtype, _backend.target(dev), backward=True), dev)
    else:  # nothing to mix (P or C is 0): every gradient is zero, as the reference's
        for t in (dx, dparams, dbc, dbs):
            t.zero_()
    return dx, dparams, dbc.sum(0).to(x.dtype), dbs.sum(0).to(x.dtype)


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("sparseformer::adaptive_mix", mutates_args=())
def _adaptive_mix_op(x: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor, backend: str) -> Tensor:
    return adaptive_mix_fwd(x, params, channel_bias, spatial_bias, backend)


@_adaptive_mix_op.register_fake
def _(x, params, channel_bias, spatial_bias, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("sparseformer::adaptive_mix_backward", mutates_args=())
def _adaptive_mix_backward_op(
    grad_out: Tensor, x: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(adaptive_mix_bwd(grad_out, x, params, channel_bias, spatial_bias, backend))


@_adaptive_mix_backward_op.register_fake
def _(grad_out, x, params, channel_bias, spatial_bias, backend):
    return tuple(t.new_empty(t.shape) for t in (x, params, channel_bias, spatial_bias))


def _setup_context(ctx, inputs, output):
    *tensors, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.backend = backend


def _backward(ctx, grad_out):
    return (*_adaptive_mix_backward_op(grad_out.contiguous(), *ctx.saved_tensors, ctx.backend), None)


_adaptive_mix_op.register_autograd(_backward, setup_context=_setup_context)


def mix_flops(B: int, N: int, P: int, C: int) -> int:
    """FLOPs (2 x MACs) of the two per-token GEMMs: (P x C)(C x C) and (P x P)(P x C)."""
    return 2 * B * N * (P * C * C + P * P * C)


@register_flop_formula(torch.ops.sparseformer.adaptive_mix)
def _adaptive_mix_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    return mix_flops(*x_shape)


@register_flop_formula(torch.ops.sparseformer.adaptive_mix_backward)
def _adaptive_mix_backward_flops(grad_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * mix_flops(*grad_shape)  # each GEMM's backward is two GEMMs of its size


# ----------------------------------------------------------------------------- public function
def check_mix_inputs(op: str, x: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor) -> None:
    args = dict(x=x, params=params, channel_bias=channel_bias, spatial_bias=spatial_bias)
    check_inputs(op, **args)
    check_same_dtype(op, **args)
    check_mix_shapes(op, x, params, channel_bias, spatial_bias)


def adaptive_mix(x: Tensor, params: Tensor, channel_bias: Tensor, spatial_bias: Tensor, *,
                 backend: str = "auto") -> Tensor:
    """GELU(Ms @ GELU(x @ Mc + channel_bias) + spatial_bias[:, None]) per token.

    Args:
        x: (B, N, P, C) sampled features of each token.
        params: (B, N, C*C + P*P) the generator output per token: Mc (C_in, C_out) row-major, then
            Ms (P_out, P_in) row-major.
        channel_bias: (C,).
        spatial_bias: (P,).
        backend: "auto" (Triton on CUDA, reference otherwise), "triton" or "torch".
    Returns:
        (B, N, P, C) in the inputs' dtype (all four must share one dtype).
    """
    check_mix_inputs("adaptive_mix", x, params, channel_bias, spatial_bias)
    return _adaptive_mix_op(x, params, channel_bias, spatial_bias, resolve_backend(backend, x.device))
