"""Sampling kernel (Triton, in the interpreter on CPU) against the float64 PyTorch reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernel_helpers import (
    TOL,
    assert_close,
    break_kernels,
    launch_one_program_too_few,
    poisoned,  # noqa: F401 (a fixture)
)
from kernels import sampling
from kernels.sampling import sparse_sample, sparse_sample_bwd, sparse_sample_reference, sparse_sample_reference_backward



def run_both(features, points, grad_out, clamp=None):
    """Kernel forward + backward through the public op's autograd, and the float64 reference."""
    f = features.detach().clone().requires_grad_(True)
    p = points.detach().clone().requires_grad_(True)
    out = sparse_sample(f, p, point_grad_clamp=clamp, backend="triton")
    out.backward(grad_out)
    ref = sparse_sample_reference(features.double(), points.double())
    ref_gf, ref_gp = sparse_sample_reference_backward(grad_out.double(), features.double(), points.double())
    if clamp is not None:
        ref_gp = ref_gp.clamp(-clamp, clamp)
    return (out, f.grad, p.grad), (ref, ref_gf, ref_gp)


def make_inputs(B, H, W, C, N, P, dtype, points_dtype=None, lo=-0.2, hi=1.2):
    features = torch.randn(B, H, W, C).to(dtype)
    points = (torch.rand(B, N, P, 2) * (hi - lo) + lo).to(points_dtype or dtype)
    grad_out = torch.randn(B, N, P, C).to(dtype)
    return features, points, grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 7, 40, 3, 9), (1, 6, 4, 24, 2, 25)], ids=["C40P9", "C24P25"])
def test_matches_reference(poisoned, dtype, shape):
    features, points, grad_out = make_inputs(*shape, dtype)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    assert poisoned, "the kernel outputs did not go through the poisoned allocator"
    assert out.dtype == gf.dtype == gp.dtype == dtype
    assert_close(out, ref, TOL[dtype], "forward")
    assert_close(gf, ref_gf, TOL[dtype], "grad features")
    assert_close(gp, ref_gp, TOL[dtype], "grad points")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_map_with_fp32_points(poisoned, dtype):
    features, points, grad_out = make_inputs(2, 5, 6, 24, 2, 9, dtype, points_dtype=torch.float32)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    assert gp.dtype == torch.float32
    assert_close(out, ref, TOL[dtype], "forward")
    assert_close(gf, ref_gf, TOL[dtype], "grad features")
    # grad_out is 16-bit and the point gradient sums over C products: the 16-bit bound applies
    assert_close(gp, ref_gp, TOL[dtype], "grad points")


def test_channel_loop_and_float64(poisoned):
    """C = 200 takes two BLOCK_C steps; float64 runs the kernel in float64 (tight bound)."""
    features, points, grad_out = make_inputs(1, 4, 5, 200, 1, 7, torch.float64)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    for o, r, what in [(out, ref, "forward"), (gf, ref_gf, "grad features"), (gp, ref_gp, "grad points")]:
        assert_close(o, r, TOL[torch.float64], what)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 3e38 * 2 -> inf, on purpose
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_borders_centres_and_far_outside(poisoned, dtype):
    """Points on the outer edges (0, 1), on pixel centres and pixel edges, and far outside the map.

    H and W are powers of two so these coordinates are exact in binary and kernel and reference
    see the same corners (the point gradient is one-sided at pixel centres).
    """
    H, W, C = 4, 8, 24
    xs = [0.0, 1.0, 0.5 / W, 3.5 / W, (W - 0.5) / W, 2.0 / W, -0.5 / W, 1 + 0.5 / W, -1e3, 1e3, -1e30, 3e38]
    ys = [0.0, 1.0, 0.5 / H, 1.5 / H, (H - 0.5) / H, 1.0 / H, -0.5 / H, 1 + 0.5 / H, 1e3, -1e3, 0.5, 0.5]
    grid = torch.tensor([[x, y] for x in xs for y in ys], dtype=dtype)  # all combinations
    P = 12
    points = grid.view(1, -1, P, 2).repeat(2, 1, 1, 1)
    B, N = points.shape[:2]
    features = torch.randn(B, H, W, C, dtype=dtype)
    grad_out = torch.randn(B, N, P, C, dtype=dtype)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    tol = TOL[dtype]
    assert_close(out, ref, tol, "forward")
    assert_close(gf, ref_gf, tol, "grad features")
    assert_close(gp, ref_gp, tol, "grad points")
    far = (points.abs() >= 1e3).any(-1)
    assert (out[far] == 0).all() and (gp[far] == 0).all(), "points far outside must read zeros and get no gradient"


def test_repeated_points_accumulate(poisoned):
    """Many points on one corner within one program: the scatter-add must not lose updates."""
    features, _, grad_out = make_inputs(1, 3, 3, 16, 2, 20, torch.float32)
    points = torch.full((1, 2, 20, 2), 0.4)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    assert_close(gf, ref_gf, TOL[torch.float32], "grad features")
    assert_close(out, ref, TOL[torch.float32], "forward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_point_grad_clamp(poisoned, dtype):
    features, points, grad_out = make_inputs(1, 6, 6, 32, 2, 9, dtype, lo=0.05, hi=0.95)
    clamp = 0.5
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features * 4, points, grad_out, clamp=clamp)
    unclamped = sparse_sample_reference_backward(grad_out.double(), features.double() * 4, points.double())[1]
    assert (unclamped.abs() > clamp).float().mean() > 0.3, "the clamp must actually bite in this test"
    assert gp.abs().max() <= clamp
    assert_close(gp, ref_gp, TOL[dtype], "clamped grad points")
    assert_close(gf, ref_gf, TOL[dtype], "grad features (never clamped)")


def test_gradcheck_float64():
    features = torch.randn(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    points = (torch.rand(1, 2, 3, 2, dtype=torch.float64) * 1.2 - 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f, p: sparse_sample(f, p, backend="triton"), (features, points), fast_mode=True
    )


def test_non_contiguous_inputs(poisoned):
    B, H, W, C, N, P = 2, 5, 6, 20, 3, 5
    features = torch.randn(B, C, H, W).permute(0, 2, 3, 1)  # channels-last view of NCHW memory
    points = torch.rand(B, P, N, 4)[..., ::2].transpose(1, 2)  # (B, N, P, 2), every stride unusual
    assert not features.is_contiguous() and not points.is_contiguous()
    grad_out = torch.randn(B, C, N, P).permute(0, 2, 3, 1)
    out = sampling.sparse_sample_fwd(features, points, "triton")
    gf, gp = sparse_sample_bwd(grad_out, features, points, None, "triton")
    ref = sparse_sample_reference(features.double(), points.double())
    ref_gf, ref_gp = sparse_sample_reference_backward(grad_out.double(), features.double(), points.double())
    assert_close(out, ref, 1e-5, "forward")
    assert_close(gf, ref_gf, 1e-5, "grad features")
    assert_close(gp, ref_gp, 1e-5, "grad points")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 2), H=st.integers(1, 9), W=st.integers(1, 9), C=st.integers(1, 70),
    N=st.integers(1, 3), P=st.integers(1, 13), seed=st.integers(0, 2**16),
)
def test_random_shapes(B, H, W, C, N, P, seed):
    torch.manual_seed(seed)
    features, points, grad_out = make_inputs(B, H, W, C, N, P, torch.float32)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    assert_close(out, ref, 1e-5, "forward")
    assert_close(gf, ref_gf, 1e-5, "grad features")
    assert_close(gp, ref_gp, 1e-5, "grad points")


def test_poisoning_catches_unwritten_elements(poisoned, monkeypatch):
    """Launch one program too few: the last block of points stays NaN, and the check must see it."""
    launch_one_program_too_few(monkeypatch, sampling, "sparse_sample_fwd_kernel")
    features, points, _ = make_inputs(1, 4, 4, 8, 1, 40, torch.float32)
    out = sparse_sample(features, points, backend="triton")
    assert torch.isnan(out).any()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(out, sparse_sample_reference(features.double(), points.double()), 1e-5, "forward")


def test_triton_failure_is_not_swallowed(monkeypatch):
    break_kernels(monkeypatch, sampling, "sparse_sample_fwd_kernel", "sparse_sample_bwd_kernel")
    features, points, _ = make_inputs(1, 4, 4, 8, 1, 4, torch.float32)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        sparse_sample(features, points, backend="triton")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        sparse_sample_bwd(torch.randn(1, 1, 4, 8), features, points, None, "triton")


def test_backend_dispatch(monkeypatch):
    assert kernels.resolve_backend("auto", torch.device("cuda")) == "triton"
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA"):
        kernels.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "features, points, kwargs, match",
    [
        (torch.randn(2, 4, 4, 8), torch.rand(3, 1, 4, 2), {}, "batch of points"),
        (torch.randn(4, 4, 8), torch.rand(1, 1, 4, 2), {}, "features must be"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 4, 3), {}, "points must be"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2, dtype=torch.float64), {}, "cast them to one dtype"),
        (torch.randn(1, 4, 4, 8), torch.randint(0, 2, (1, 1, 4, 2)), {}, "must be float16"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2, device="meta"), {}, "one device"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2), {"point_grad_clamp": -1.0}, "positive"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2), {"backend": "cuda"}, "backend must be"),
    ],
)
def test_value_errors(features, points, kwargs, match):
    kwargs = {"backend": "triton", **kwargs}
    with pytest.raises(ValueError, match=match):
        sparse_sample(features, points, **kwargs)
