"""Mixing kernel (Triton, in the interpreter on CPU) against the float64 PyTorch reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_helpers import (
    TOL,
    assert_close,
    break_kernels,
    launch_one_program_too_few,
    poisoned,  # noqa: F401 (a fixture)
)
from kernels import mixing
from kernels.mixing import adaptive_mix, adaptive_mix_bwd, adaptive_mix_reference, adaptive_mix_reference_backward

NAMES = ("x", "channel_weight", "channel_bias", "spatial_weight", "spatial_bias")


def make_inputs(B, N, P, C, dtype):
    """Weights scaled like the model's generated ones so activations stay O(1); biases large
    enough that GELU(bias) in padded rows would visibly corrupt the spatial mix."""
    x = torch.randn(B, N, P, C)
    mc = torch.randn(B, N, C, C) / C**0.5
    bc = torch.randn(C)
    ms = torch.randn(B, N, P, P) / P**0.5
    bs = torch.randn(P) * 2
    grad_out = torch.randn(B, N, P, C)
    return [t.to(dtype) for t in (x, mc, bc, ms, bs)], grad_out.to(dtype)


def run_both(inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = adaptive_mix(*leaves, backend="triton")
    out.backward(grad_out)
    ref_in = [t.double() for t in inputs]
    ref = adaptive_mix_reference(*ref_in)
    ref_grads = adaptive_mix_reference_backward(grad_out.double(), *ref_in)
    return (out, *[t.grad for t in leaves]), (ref, *ref_grads)


def check_all(got, ref, tol):
    for o, r, what in zip(got, ref, ("forward", *(f"grad {n}" for n in NAMES))):
        assert_close(o, r, tol, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 9, 40), (2, 1, 25, 24)], ids=["P9C40", "P25C24"])
def test_matches_reference(poisoned, dtype, shape):
    inputs, grad_out = make_inputs(*shape, dtype)
    got, ref = run_both(inputs, grad_out)
    assert poisoned, "the kernel outputs did not go through the poisoned allocator"
    assert all(t.dtype == dtype for t in got)
    check_all(got, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paper_shape(poisoned, dtype):
    """P = 36, C = 96 (padded to 64 x 128; three 32-channel output blocks)."""
    inputs, grad_out = make_inputs(1, 1, 36, 96, dtype)
    got, ref = run_both(inputs, grad_out)
    check_all(got, ref, TOL[dtype])


def test_float64_runs_in_float64(poisoned):
    inputs, grad_out = make_inputs(1, 2, 7, 20, torch.float64)
    got, ref = run_both(inputs, grad_out)
    check_all(got, ref, TOL[torch.float64])


def test_gradcheck_float64():
    inputs, _ = make_inputs(1, 2, 5, 6, torch.float64)
    inputs = [t.requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: adaptive_mix(*a, backend="triton"), inputs, fast_mode=True)


def test_non_contiguous_inputs(poisoned):
    B, N, P, C = 2, 2, 9, 24
    x = torch.randn(B, P, N, C).transpose(1, 2)
    mc = torch.randn(B, N, C, C).transpose(-1, -2) / C**0.5  # read as (C_in, C_out) through strides
    bc = torch.randn(2 * C)[::2]
    ms = torch.randn(N, B, P, P).transpose(0, 1) / P**0.5
    bs = torch.randn(P, 3)[:, 1]
    grad_out = torch.randn(B, N, C, P).transpose(-1, -2)
    inputs = [x, mc, bc, ms, bs]
    assert not any(t.is_contiguous() for t in inputs + [grad_out])
    out = mixing.adaptive_mix_fwd(*inputs, "triton")
    grads = adaptive_mix_bwd(grad_out, *inputs, "triton")
    ref_in = [t.double() for t in inputs]
    ref = adaptive_mix_reference(*ref_in)
    ref_grads = adaptive_mix_reference_backward(grad_out.double(), *ref_in)
    check_all((out, *grads), (ref, *ref_grads), 1e-5)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), N=st.integers(1, 2), P=st.integers(1, 40), C=st.integers(1, 70),
       seed=st.integers(0, 2**16))
def test_random_shapes(B, N, P, C, seed):
    torch.manual_seed(seed)
    inputs, grad_out = make_inputs(B, N, P, C, torch.float32)
    got, ref = run_both(inputs, grad_out)
    check_all(got, ref, 1e-5)


def test_poisoning_catches_unwritten_elements(poisoned, monkeypatch):
    """Launch one program too few: the last token stays NaN, and the check must see it."""
    launch_one_program_too_few(monkeypatch, mixing, "adaptive_mix_fwd_kernel")
    inputs, _ = make_inputs(1, 2, 9, 24, torch.float32)
    out = adaptive_mix(*inputs, backend="triton")
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(out, adaptive_mix_reference(*[t.double() for t in inputs]), 1e-5, "forward")


def test_triton_failure_is_not_swallowed(monkeypatch):
    break_kernels(monkeypatch, mixing, "adaptive_mix_fwd_kernel", "adaptive_mix_bwd_kernel")
    inputs, grad_out = make_inputs(1, 1, 4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        adaptive_mix(*inputs, backend="triton")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        adaptive_mix_bwd(grad_out, *inputs, "triton")


def _bad(index, value):
    inputs, _ = make_inputs(1, 2, 4, 8, torch.float32)
    inputs[index] = value
    return inputs


@pytest.mark.parametrize(
    "inputs, match",
    [
        (_bad(0, torch.randn(2, 4, 8)), "x must be"),
        (_bad(1, torch.randn(1, 2, 8, 4)), "channel_weight must have shape"),
        (_bad(2, torch.randn(4)), "channel_bias must have shape"),
        (_bad(3, torch.randn(1, 1, 4, 4)), "spatial_weight must have shape"),
        (_bad(4, torch.randn(8)), "spatial_bias must have shape"),
        (_bad(1, torch.randn(1, 2, 8, 8, dtype=torch.float64)), "cast them to one dtype"),
        (_bad(2, torch.randn(8, dtype=torch.float16)), "cast them to one dtype"),
        (_bad(3, torch.randn(1, 2, 4, 4, device="meta")), "one device"),
        (_bad(0, torch.ones(1, 2, 4, 8, dtype=torch.int32)), "must be float16"),
    ],
)
def test_value_errors(inputs, match):
    with pytest.raises(ValueError, match=match):
        adaptive_mix(*inputs, backend="triton")
