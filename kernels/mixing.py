"""Adaptive mixing: per-token dynamic channel and spatial GEMMs (AdaMixer-style, one group).

For every token (b, n), with x its (P, C) sampled features (SPEC.md, step 5):
    h   = GELU(x @ Mc + beta_c)          Mc: (C_in, C_out), beta_c: (C,)
    out = GELU(Ms @ h + beta_s[:, None]) Ms: (P_out, P_in), beta_s: (P,)

Layout of this module: reference -> host wrappers -> torch.library ops (+ FLOP formula,
autograd) -> public function.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

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


# ----------------------------------------------------------------------------- host wrappers
def adaptive_mix_fwd(x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend: str) -> Tensor:
    if backend == "triton":
        raise NotImplementedError("the Triton mixing kernel is not implemented yet; use backend='torch'")
    return adaptive_mix_reference(x, channel_weight, channel_bias, spatial_weight, spatial_bias)


def adaptive_mix_bwd(grad_out, x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend: str):
    if backend == "triton":
        raise NotImplementedError("the Triton mixing kernel is not implemented yet; use backend='torch'")
    return adaptive_mix_reference_backward(grad_out, x, channel_weight, channel_bias, spatial_weight, spatial_bias)


# ----------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("sparseformer::adaptive_mix", mutates_args=())
def _adaptive_mix_op(
    x: Tensor, channel_weight: Tensor, channel_bias: Tensor, spatial_weight: Tensor, spatial_bias: Tensor, backend: str
) -> Tensor:
    return adaptive_mix_fwd(x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend)


@_adaptive_mix_op.register_fake
def _(x, channel_weight, channel_bias, spatial_weight, spatial_bias, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


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
    return tuple(torch.empty_like(t) for t in (x, channel_weight, channel_bias, spatial_weight, spatial_bias))


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
