"""Sampling kernel (Triton: the interpreter on CPU, compiled on a GPU) against the float64 PyTorch
reference: 2-D (bilinear) and 3-D (trilinear), NaN/inf points, the clamp, determinism, the
map-gradient chain."""
import warnings

import pytest
import torch

import kernels
from kernel_helpers import (
    TOL,
    assert_close,
    assert_same_nans_and_close,
    break_kernels,
    given,
    gpu_when_compiled,
    launch_one_program_too_few,
    settings,
    st,
    to64,
)
from kernels import FeatureMap, sampling
from kernels import backend as kbackend
from kernels.sampling import sparse_sample, sparse_sample_bwd, sparse_sample_reference, sparse_sample_reference_backward

pytestmark = pytest.mark.usefixtures("pin_fp32_matmul")  # fp32 at "highest": the 1e-5 bound


def run_both(features, points, grad_out, clamp=None, backend="triton"):
    """Kernel forward + backward through the public op's autograd, and the float64 reference (CPU)."""
    f = features.detach().clone().requires_grad_(True)
    p = points.detach().clone().requires_grad_(True)
    out = sparse_sample(f, p, point_grad_clamp=clamp, backend=backend)
    out.backward(grad_out)
    f64, p64, g64 = to64(features, points, grad_out)
    ref = sparse_sample_reference(f64, p64)
    ref_gf, ref_gp = sparse_sample_reference_backward(g64, f64, p64)
    if clamp is not None:
        bound = torch.tensor(clamp, dtype=torch.float64)
        ref_gp = torch.maximum(torch.minimum(ref_gp, bound), -bound)
    return (out, f.grad, p.grad), (ref, ref_gf, ref_gp)


def make_inputs(B, T, H, W, C, N, P, D, dtype, device="cpu", points_dtype=None, lo=-0.2, hi=1.2):
    """A (B, H, W, C) map with (x, y) points (D = 2) or a (B, T, H, W, C) volume with (x, y, t) points."""
    features = torch.randn((B, H, W, C) if D == 2 else (B, T, H, W, C)).to(dtype)
    points_dtype = points_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    points = (torch.rand(B, N, P, D) * (hi - lo) + lo).to(points_dtype)
    grad_out = torch.randn(B, N, P, C).to(dtype)
    return features.to(device), points.to(device), grad_out.to(device)


DIMS = [pytest.param(2, id="2d"), pytest.param(3, id="3d")]


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 40, 3, 9), (1, 2, 6, 4, 24, 2, 25)], ids=["C40P9", "C24P25"])
def test_matches_reference(poisoned, device, D, dtype, shape):
    features, points, grad_out = make_inputs(*shape, D, dtype, device)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    assert poisoned, "the kernel outputs did not go through the poisoned allocator"
    assert out.dtype == gf.dtype == dtype and gp.dtype == torch.float32
    assert_close(out, ref, TOL[dtype], "forward")
    assert_close(gf, ref_gf, TOL[dtype], "grad features")
    # grad_out is 16-bit and the point gradient sums over C products: the map's bound applies
    assert_close(gp, ref_gp, TOL[dtype], "grad points")


@pytest.mark.parametrize("D", DIMS)
def test_channel_loop_and_float64(poisoned, device, D):
    """C = 200 takes several BLOCK_C steps; float64 runs the kernel in float64 (tight bound)."""
    features, points, grad_out = make_inputs(1, 3, 4, 5, 200, 1, 7, D, torch.float64, device)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    for o, r, what in [(out, ref, "forward"), (gf, ref_gf, "grad features"), (gp, ref_gp, "grad points")]:
        assert_close(o, r, TOL[torch.float64], what)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # 3e38 * 2 -> inf, on purpose
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_borders_centres_and_far_outside(poisoned, device, dtype):
    """Points on the outer edges (0, 1), on pixel centres and pixel edges, and far outside the map.

    H and W are powers of two so these coordinates are exact in binary and kernel and reference
    see the same corners (the point gradient is one-sided at pixel centres).
    """
    H, W, C = 4, 8, 24
    xs = [0.0, 1.0, 0.5 / W, 3.5 / W, (W - 0.5) / W, 2.0 / W, -0.5 / W, 1 + 0.5 / W, -1e3, 1e3, -1e30, 3e38]
    ys = [0.0, 1.0, 0.5 / H, 1.5 / H, (H - 0.5) / H, 1.0 / H, -0.5 / H, 1 + 0.5 / H, 1e3, -1e3, 0.5, 0.5]
    grid = torch.tensor([[x, y] for x in xs for y in ys], dtype=dtype)  # all combinations
    P = 12
    points = grid.view(1, -1, P, 2).repeat(2, 1, 1, 1).to(device)
    B, N = points.shape[:2]
    features = torch.randn(B, H, W, C, dtype=dtype).to(device)
    grad_out = torch.randn(B, N, P, C, dtype=dtype).to(device)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    tol = TOL[dtype]
    assert_close(out, ref, tol, "forward")
    assert_close(gf, ref_gf, tol, "grad features")
    assert_close(gp, ref_gp, tol, "grad points")
    far = (points.abs() >= 1e3).any(-1)
    assert (out[far] == 0).all() and (gp[far] == 0).all(), "points far outside must read zeros and get no gradient"


@pytest.mark.parametrize("D", DIMS)
def test_volume_borders_along_time(poisoned, device, D):
    """Points at t = 0, 1, between frames and outside the clip: trilinear weights on the time axis."""
    T, H, W, C = 4, 4, 4, 8
    ts = [0.0, 1.0, 0.5 / T, 1.5 / T, 1.0 / T, -0.5 / T, 1 + 0.5 / T, 0.3, -1e4]
    points = torch.tensor([[0.4, 0.6, t][:D] for t in ts]).view(1, 1, len(ts), D).to(device)
    features = torch.randn((1, H, W, C) if D == 2 else (1, T, H, W, C)).to(device)
    grad_out = torch.randn(1, 1, len(ts), C).to(device)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    for o, r, what in [(out, ref, "forward"), (gf, ref_gf, "grad features"), (gp, ref_gp, "grad points")]:
        assert_close(o, r, 1e-5, what)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_and_inf_points_give_nan_like_the_reference(poisoned, device, D, dtype):
    """A NaN or +-inf coordinate reads NaN in every channel and gets a NaN gradient; it adds nothing
    to the map's gradient. Both backends agree with the float64 reference, forward and backward."""
    features, points, grad_out = make_inputs(1, 3, 5, 6, 16, 2, 8, D, dtype, device, lo=0.1, hi=0.9)
    bad = [(0, 0, 0, float("nan")), (0, 1, 1, float("inf")), (1, 2, 0, -float("inf")), (1, 3, D - 1, float("nan"))]
    for n, p, axis, value in bad:
        points[0, n, p, axis] = value
    for backend in ("torch", "triton"):
        (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out, clamp=0.5, backend=backend)
        bad_points = ~torch.isfinite(points).all(-1)
        assert torch.isnan(out[bad_points]).all() and not torch.isnan(out[~bad_points]).any(), backend
        assert torch.isnan(gp[bad_points]).all() and not torch.isnan(gp[~bad_points]).any(), backend
        assert_same_nans_and_close(out, ref, TOL[dtype], f"{backend} forward")
        assert_same_nans_and_close(gp, ref_gp, TOL[dtype], f"{backend} grad points")
        assert_close(gf, ref_gf, TOL[dtype], f"{backend} grad features")  # finite: bad points add nothing


def test_nan_gradient_passes_the_clamp(poisoned, device):
    """A NaN reaching the point gradient (here through grad_out) is not clamped away."""
    features, points, grad_out = make_inputs(1, 1, 5, 6, 16, 1, 4, 2, torch.float32, device, lo=0.2, hi=0.8)
    grad_out[0, 0, 1, 3] = float("nan")
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out, clamp=1e-3)
    assert torch.isnan(gp[0, 0, 1]).all() and torch.isfinite(gp[0, 0, [0, 2, 3]]).all()
    assert_same_nans_and_close(gp, ref_gp, 1e-5, "grad points")


def test_repeated_points_accumulate(poisoned, device):
    """Many points on one corner within one program: the scatter-add must not lose updates."""
    features, _, grad_out = make_inputs(1, 1, 3, 3, 16, 2, 20, 2, torch.float32, device)
    points = torch.full((1, 2, 20, 2), 0.4, device=device)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    assert_close(gf, ref_gf, TOL[torch.float32], "grad features")
    assert_close(out, ref, TOL[torch.float32], "forward")


@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_point_grad_clamp_per_axis(poisoned, device, D, dtype):
    features, points, grad_out = make_inputs(1, 3, 6, 6, 32, 2, 9, D, dtype, device, lo=0.05, hi=0.95)
    clamp = [0.5, 0.25, 0.125][:D]
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features * 4, points, grad_out, clamp=clamp)
    f64, p64, g64 = to64(features * 4, points, grad_out)
    unclamped = sparse_sample_reference_backward(g64, f64, p64)[1]
    for axis, bound in enumerate(clamp):
        assert (unclamped[..., axis].abs() > bound).float().mean() > 0.3, "the clamp must actually bite"
        assert gp[..., axis].abs().max() <= bound
    assert_close(gp, ref_gp, TOL[dtype], "clamped grad points")
    assert_close(gf, ref_gf, TOL[dtype], "grad features (never clamped)")


@pytest.mark.parametrize("D", DIMS)
def test_gradcheck_float64(device, D):
    features = torch.randn((1, 4, 5, 6) if D == 2 else (1, 3, 4, 5, 6), dtype=torch.float64, device=device)
    points = torch.rand(1, 2, 3, D, dtype=torch.float64, device=device) * 1.2 - 0.1
    assert torch.autograd.gradcheck(
        lambda f, p: sparse_sample(f, p, backend="triton"),
        (features.requires_grad_(True), points.requires_grad_(True)), fast_mode=True,
        nondet_tol=1e-12,  # the map gradient's fp64 atomics add in any order on a GPU: last-bit differences
    )


@pytest.mark.parametrize("D", DIMS)
def test_non_contiguous_inputs(poisoned, device, D):
    B, T, H, W, C, N, P = 2, 3, 5, 6, 20, 3, 5
    if D == 2:
        features = torch.randn(B, C, H, W, device=device).permute(0, 2, 3, 1)  # channels-last view of NCHW memory
    else:
        features = torch.randn(B, C, T, H, W, device=device).permute(0, 2, 3, 4, 1)
    points = torch.rand(B, P, N, 2 * D, device=device)[..., ::2].transpose(1, 2)  # (B, N, P, D), every stride unusual
    assert not features.is_contiguous() and not points.is_contiguous()
    grad_out = torch.randn(B, C, N, P, device=device).permute(0, 2, 3, 1)
    out = sampling.sparse_sample_fwd(features, points, "triton")
    grad_map = torch.zeros(features.shape, device=device)
    gp = sparse_sample_bwd(grad_out, features, points, grad_map, None, "triton")
    f64, p64, g64 = to64(features, points, grad_out)
    ref = sparse_sample_reference(f64, p64)
    ref_gf, ref_gp = sparse_sample_reference_backward(g64, f64, p64)
    assert_close(out, ref, 1e-5, "forward")
    assert_close(grad_map, ref_gf, 1e-5, "grad features")
    assert_close(gp, ref_gp, 1e-5, "grad points")


@gpu_when_compiled
@settings(max_examples=6, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), T=st.integers(1, 4), H=st.integers(1, 9), W=st.integers(1, 9), C=st.integers(1, 70),
       N=st.integers(1, 3), P=st.integers(1, 13), D=st.sampled_from([2, 3]), seed=st.integers(0, 2**16))
def test_random_shapes(B, T, H, W, C, N, P, D, seed):
    torch.manual_seed(seed)
    device = torch.device(kernel_device())
    features, points, grad_out = make_inputs(B, T, H, W, C, N, P, D, torch.float32, device)
    (out, gf, gp), (ref, ref_gf, ref_gp) = run_both(features, points, grad_out)
    assert_close(out, ref, 1e-5, "forward")
    assert_close(gf, ref_gf, 1e-5, "grad features")
    assert_close(gp, ref_gp, 1e-5, "grad points")


def kernel_device() -> str:
    """hypothesis tests cannot take a parametrized fixture: the first kernel device, or skip."""
    from kernel_helpers import kernel_devices

    devices = kernel_devices()
    if not devices:
        pytest.skip("no device runs the Triton kernels here")
    return devices[0].values[0]


def test_poisoning_catches_unwritten_elements(poisoned, device, monkeypatch):
    """Launch one program too few: the last block of points stays NaN, and the check must see it."""
    launch_one_program_too_few(monkeypatch, sampling, "sparse_sample_fwd_kernel")
    features, points, _ = make_inputs(1, 1, 4, 4, 8, 1, 40, 2, torch.float32, device)
    out = sparse_sample(features, points, backend="triton")
    assert torch.isnan(out).any()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(out, sparse_sample_reference(*to64(features, points)), 1e-5, "forward")


def test_triton_failure_is_not_swallowed(device, monkeypatch):
    break_kernels(monkeypatch, sampling, "sparse_sample_fwd_kernel", "sparse_sample_bwd_kernel")
    features, points, grad_out = make_inputs(1, 1, 4, 4, 8, 1, 4, 2, torch.float32, device)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        sparse_sample(features, points, backend="triton")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        sparse_sample_bwd(grad_out, features, points, torch.zeros(features.shape, device=device), None, "triton")


def test_deterministic_mode_refuses_the_atomic_backward(device):
    """As ATen's grid_sample backward on CUDA: an error under use_deterministic_algorithms(True),
    a warning with warn_only=True; the forward and the reference backward are unaffected."""
    features, points, grad_out = make_inputs(1, 1, 4, 5, 8, 2, 3, 2, torch.float32, device)
    f = features.clone().requires_grad_(True)
    try:
        torch.use_deterministic_algorithms(True)
        out = sparse_sample(f, points, backend="triton")
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            out.backward(grad_out)
        if device.type == "cpu":  # the reference's CPU backward is deterministic
            sparse_sample(f, points, backend="torch").backward(grad_out)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            sparse_sample(f, points, backend="triton").backward(grad_out)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("D", DIMS)
def test_everything_but_the_map_gradient_is_bitwise_reproducible(device, D):
    """Run to run: the forward and the points' gradient are bitwise equal (the map gradient's
    float atomics may differ in the last bits on a GPU)."""
    features, points, grad_out = make_inputs(2, 3, 6, 7, 40, 4, 9, D, torch.float32, device)
    runs = [run_both(features, points, grad_out, clamp=0.3)[0] for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]), "forward differs between runs"
    assert torch.equal(runs[0][2], runs[1][2]), "points' gradient differs between runs"
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_feature_map_accumulates_every_step_into_one_buffer(device, monkeypatch, backend):
    """Three sampling steps of one FeatureMap: one fp32 accumulator is allocated (by the last step's
    backward) and handed back through the chain; the map's gradient is the sum of the steps'."""
    features, _, _ = make_inputs(2, 1, 5, 6, 12, 3, 4, 2, torch.bfloat16, device)
    steps = [make_inputs(2, 1, 5, 6, 12, 3, 4, 2, torch.bfloat16, device)[1:] for _ in range(3)]
    buffers, real = [], sampling.accumulator

    def spy(grad_token, feats):
        buffer = real(grad_token, feats)
        buffers.append((buffer.data_ptr(), buffer.dtype))
        return buffer

    monkeypatch.setattr(sampling, "accumulator", spy)
    f = features.clone().requires_grad_(True)
    fmap = FeatureMap(f, backend=backend)
    outs = [fmap.sample(p) for p, _ in steps]
    torch.autograd.backward(outs, [g for _, g in steps])
    assert len(buffers) == 3 and len({ptr for ptr, _ in buffers}) == 1 and buffers[0][1] == torch.float32
    f64 = to64(features)[0]
    ref = sum(sparse_sample_reference_backward(*to64(g), f64, *to64(p))[0] for p, g in steps)
    assert f.grad.dtype == torch.bfloat16
    assert_close(f.grad, ref, TOL[torch.bfloat16], "summed map gradient")


def test_backend_dispatch(monkeypatch):
    cuda = torch.device("cuda")
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    # auto on a GPU: the compiled kernels; not kernels decorated for the interpreter (they would copy
    # every tensor to the host), nor on ROCm (the kernels target NVIDIA), where an explicit ask fails
    monkeypatch.setattr(kbackend, "INTERPRETER_AT_IMPORT", True)
    assert kernels.resolve_backend("auto", cuda) == "torch"
    monkeypatch.setattr(kbackend, "INTERPRETER_AT_IMPORT", False)
    assert kernels.resolve_backend("auto", cuda) == "triton"
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert kernels.resolve_backend("auto", cuda) == "torch"
    with pytest.raises(ValueError, match="on ROCm use backend='torch'"):
        kernels.resolve_backend("triton", cuda)
    monkeypatch.setattr(torch.version, "hip", None)
    # launches made current on the tensors' GPU (Triton launches on the current device otherwise)
    guard = kbackend.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA"):
        kernels.resolve_backend("triton", torch.device("cpu"))
    # the interpreter asked for after the kernels were built for a GPU: say so, not "0 active drivers"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="set after `kernels` was imported"):
        kernels.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize(
    "features, points, kwargs, match",
    [
        (torch.randn(2, 4, 4, 8), torch.rand(3, 1, 4, 2), {}, "batch of points"),
        (torch.randn(4, 4, 8), torch.rand(1, 1, 4, 2), {}, "sample a .B, H, W, C. map"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 3), {}, "sample a .B, T, H, W, C. map"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 4, 4), {}, "points must be"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2, dtype=torch.float64), {}, "cast them to one precision"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2, dtype=torch.bfloat16), {}, "16-bit coordinates"),
        (torch.randn(1, 4, 4, 8, dtype=torch.float16), torch.rand(1, 1, 4, 2, dtype=torch.float16), {}, "16-bit"),
        (torch.randn(1, 4, 4, 8), torch.randint(0, 2, (1, 1, 4, 2)), {}, "must be float16"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2, device="meta"), {}, "one device"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2), {"point_grad_clamp": -1.0}, "positive"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2), {"point_grad_clamp": [1.0, 2.0, 3.0]}, "one per axis"),
        (torch.randn(1, 4, 4, 8), torch.rand(1, 1, 4, 2), {"backend": "cuda"}, "backend must be"),
        (torch.randn(1, 0, 4, 8), torch.rand(1, 1, 4, 2), {}, r"empty \(H, W\) axis"),
        (torch.randn(1, 0, 4, 4, 8), torch.rand(1, 1, 4, 3), {}, r"empty \(T, H, W\) axis"),
    ],
)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_value_errors(features, points, kwargs, match, backend):
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(ValueError, match=match):
        sparse_sample(features, points, **kwargs)


def test_a_zero_dim_tensor_clamp_is_one_bound_for_every_axis():
    features, points = torch.randn(1, 4, 4, 2, requires_grad=True), torch.rand(1, 1, 3, 2, requires_grad=True)
    sparse_sample(features, points, point_grad_clamp=torch.tensor(1e-3), backend="torch").sum().backward()
    assert points.grad.abs().max() <= 1e-3


def test_no_warnings_from_nan_handling(device):
    """Non-finite points are detected without arithmetic on them (no 'invalid value' warnings)."""
    features, points, _ = make_inputs(1, 1, 4, 4, 8, 1, 4, 2, torch.float32, device)
    points[0, 0, 0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = sparse_sample(features, points, backend="triton")
    assert torch.isnan(out[0, 0, 0]).all()
