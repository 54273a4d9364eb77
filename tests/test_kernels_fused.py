"""Fused sample+mix kernel (Triton: the interpreter on CPU, compiled on a GPU) against the float64
composition of the sampling and mixing references, forward and every gradient."""
import pytest
import torch

from kernel_helpers import (
    TOL,
    assert_close,
    assert_same_nans_and_close,
    break_kernels,
    launch_one_program_too_few,
    to64,
)
from kernels import FeatureMap, fused, sample_and_mix
from kernels.fused import sample_and_mix_reference, sample_and_mix_reference_backward

NAMES = ("forward", "grad features", "grad points", "grad params", "grad channel_bias", "grad spatial_bias")

pytestmark = pytest.mark.usefixtures("pin_fp32_matmul")  # fp32 at "highest": the 1e-5 bound


def make_inputs(B, T, H, W, C, N, P, D, dtype, device="cpu", map_dtype=None, lo=-0.2, hi=1.2):
    """Map (B, [T,] H, W, C) in map_dtype (default: dtype), fp32 points, mixing inputs and grad in dtype."""
    map_dtype = map_dtype or dtype
    features = torch.randn((B, H, W, C) if D == 2 else (B, T, H, W, C)).to(map_dtype)
    points = (torch.rand(B, N, P, D) * (hi - lo) + lo).to(torch.float64 if dtype == torch.float64 else torch.float32)
    params = torch.cat([(torch.randn(B, N, C, C) / C**0.5).flatten(2), (torch.randn(B, N, P, P) / P**0.5).flatten(2)],
                       dim=-1).to(dtype)
    bc, bs = torch.randn(C).to(dtype), (torch.randn(P) * 2).to(dtype)
    grad_out = torch.randn(B, N, P, C).to(dtype)
    return [t.to(device) for t in (features, points, params, bc, bs)], grad_out.to(device)


def run_both(inputs, grad_out, clamp=None, backend="triton"):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = sample_and_mix(*leaves, point_grad_clamp=clamp, backend=backend)
    out.backward(grad_out)
    ref_in = to64(*inputs)
    ref = sample_and_mix_reference(*ref_in)
    g_f, g_p, *g_mix = sample_and_mix_reference_backward(to64(grad_out)[0], *ref_in)
    if clamp is not None:  # a scalar, or one bound per axis (x, y, t)
        bound = g_p.new_tensor(clamp)
        g_p = torch.maximum(torch.minimum(g_p, bound), -bound)
    return (out, *[t.grad for t in leaves]), (ref, g_f, g_p, *g_mix)


def check_all(got, ref, tol):
    for o, r, what in zip(got, ref, NAMES, strict=True):
        assert_close(o, r, tol, what)


@pytest.mark.parametrize("D", [2, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 40, 2, 9), (1, 2, 6, 5, 24, 2, 36)], ids=["C40P9", "C24P36"])
def test_matches_composed_reference(poisoned, device, D, dtype, shape):
    inputs, grad_out = make_inputs(*shape, D, dtype, device)
    got, ref = run_both(inputs, grad_out)
    assert poisoned, "the kernel outputs did not go through the poisoned allocator"
    assert got[0].dtype == dtype
    check_all(got, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_map_with_16bit_mixing(poisoned, device, dtype):
    """AMP: the stem's map stays fp32, the generator output is 16-bit (the model's case)."""
    inputs, grad_out = make_inputs(2, 1, 6, 6, 32, 3, 16, 2, dtype, device, map_dtype=torch.float32)
    got, ref = run_both(inputs, grad_out)
    assert got[1].dtype == torch.float32 and got[0].dtype == dtype
    check_all(got, ref, TOL[dtype])


def test_paper_shape_float64_and_clamp(poisoned, device):
    """P = 36, C = 96 (rows 32 + 16), fp64, points outside the map, the clamp."""
    inputs, grad_out = make_inputs(1, 1, 7, 7, 96, 2, 36, 2, torch.float64, device)
    inputs[0] = inputs[0] * 4
    got, ref = run_both(inputs, grad_out, clamp=0.05)
    assert (ref[2].abs() >= 0.05).float().mean() > 0.2, "the clamp must bite"
    check_all(got, ref, TOL[torch.float64])


def test_3d_clamp_is_per_axis(poisoned, device):
    """The video model's clamp: one bound per axis (x, y, t), each applied to its own coordinate."""
    inputs, grad_out = make_inputs(1, 3, 6, 5, 16, 2, 9, 3, torch.float64, device)
    inputs[0] = inputs[0] * 4
    clamp = [0.08, 0.03, 0.2]
    got, ref = run_both(inputs, grad_out, clamp=clamp)
    for axis, bound in enumerate(clamp):  # every axis bites, at its own bound
        g = ref[2][..., axis].abs()
        assert (g == bound).any() and g.max() <= bound
    check_all(got, ref, TOL[torch.float64])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_points_far_outside_read_zero(poisoned, device):
    inputs, grad_out = make_inputs(1, 1, 4, 4, 16, 2, 9, 2, torch.float32, device)
    inputs[1][0, 1] = torch.tensor([[-1e3, 5.0], [3e38, 0.5], [0.5, -1e30]] * 3, device=device)
    got, ref = run_both(inputs, grad_out)
    check_all(got, ref, TOL[torch.float32])
    assert (got[2][0, 1] == 0).all(), "points far outside get no gradient"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("D", [2, 3], ids=["2d", "3d"])
def test_nan_point_poisons_its_token_like_the_reference(poisoned, device, D):
    """A NaN point makes its token's mixed output NaN (the spatial mix spreads it over the token),
    and leaves the other tokens untouched: exactly the composed reference's NaN pattern."""
    inputs, grad_out = make_inputs(1, 3, 5, 6, 16, 3, 9, D, torch.float32, device, lo=0.1, hi=0.9)
    inputs[1][0, 1, 4, 0] = float("nan")
    got, ref = run_both(inputs, grad_out)
    assert torch.isnan(got[0][0, 1]).all() and torch.isfinite(got[0][0, [0, 2]]).all()
    for o, r, what in zip(got, ref, NAMES, strict=True):
        assert_same_nans_and_close(o, r, TOL[torch.float32], what)


@pytest.mark.parametrize("D", [2, 3], ids=["2d", "3d"])
def test_gradcheck_float64(device, D):
    inputs, _ = make_inputs(1, 2, 4, 5, 6, 2, 5, D, torch.float64, device)
    inputs = [t.requires_grad_(True) for t in inputs]
    # nondet_tol: the map gradient's fp64 atomics add in any order on a GPU (last-bit differences run to run)
    assert torch.autograd.gradcheck(lambda *a: sample_and_mix(*a, backend="triton"), inputs, fast_mode=True,
                                    nondet_tol=1e-12)


def test_feature_map_mixes_fused_and_unfused_steps(device):
    """One FeatureMap, a fused step then an unfused one (sample, then mix): one accumulator, and the
    same gradients as the composed reference."""
    inputs, grad_out = make_inputs(1, 1, 5, 6, 12, 2, 9, 2, torch.float32, device)
    points2 = torch.rand_like(inputs[1])
    leaves = [t.detach().clone().requires_grad_(True) for t in (*inputs, points2)]
    f, p1, prm, bc, bs, p2 = leaves
    fmap = FeatureMap(f, backend="triton")
    out1 = fmap.sample_and_mix(p1, prm, bc, bs)
    out2 = fmap.sample(p2)
    torch.autograd.backward([out1, out2], [grad_out, grad_out])
    f64, p1_64, prm64, bc64, bs64, p2_64, g64 = to64(*inputs, points2, grad_out)
    ref_f = sample_and_mix_reference_backward(g64, f64, p1_64, prm64, bc64, bs64)[0]
    from kernels.sampling import sparse_sample_reference_backward

    ref_f = ref_f + sparse_sample_reference_backward(g64, f64, p2_64)[0]
    assert_close(f.grad, ref_f, 1e-5, "map gradient of both steps")


def test_poisoning_catches_unwritten_elements(poisoned, device, monkeypatch):
    launch_one_program_too_few(monkeypatch, fused, "sample_mix_fwd_kernel")
    inputs, _ = make_inputs(1, 1, 4, 4, 8, 2, 4, 2, torch.float32, device)
    out = sample_and_mix(*inputs, backend="triton")
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()


def test_triton_failure_is_not_swallowed(device, monkeypatch):
    break_kernels(monkeypatch, fused, "sample_mix_fwd_kernel", "sample_mix_bwd_kernel")
    inputs, _ = make_inputs(1, 1, 4, 4, 8, 1, 4, 2, torch.float32, device)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        sample_and_mix(*inputs, backend="triton")


def test_deterministic_mode_refuses_the_atomic_backward(device):
    inputs, grad_out = make_inputs(1, 1, 4, 4, 8, 1, 4, 2, torch.float32, device)
    inputs[0].requires_grad_(True)
    try:
        torch.use_deterministic_algorithms(True)
        out = sample_and_mix(*inputs, backend="triton")
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            out.backward(grad_out)
    finally:
        torch.use_deterministic_algorithms(False)


def test_everything_but_the_map_gradient_is_bitwise_reproducible(device):
    inputs, grad_out = make_inputs(2, 1, 6, 7, 24, 3, 36, 2, torch.float32, device)
    first, second = run_both(inputs, grad_out, clamp=0.3)[0], run_both(inputs, grad_out, clamp=0.3)[0]
    for a, b, what in zip(first, second, NAMES, strict=True):
        if what == "grad features":
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(a, b), f"{what} differs between runs"


@pytest.mark.parametrize(
    "index, value, match",
    [
        (2, torch.randn(1, 2, 10), "params must have shape"),
        (3, torch.randn(8, dtype=torch.float64), "cast them to one dtype"),
        (4, torch.randn(3), "spatial_bias must have shape"),
        (1, torch.rand(1, 2, 4, 2, dtype=torch.bfloat16), "16-bit coordinates"),
    ],
)
def test_value_errors(index, value, match):
    inputs, _ = make_inputs(1, 1, 4, 4, 8, 2, 4, 2, torch.float32)
    inputs[index] = value
    with pytest.raises(ValueError, match=match):
        sample_and_mix(*inputs, backend="torch")


def test_errors_name_the_function_called():
    """sample_and_mix builds a FeatureMap, but its errors name sample_and_mix, what the user called."""
    inputs, _ = make_inputs(1, 1, 4, 4, 8, 2, 4, 2, torch.float32)
    with pytest.raises(ValueError, match=r"^sample_and_mix: point_grad_clamp must be positive, one number or 2"):
        sample_and_mix(*inputs, point_grad_clamp=[1.0, 2.0, 3.0], backend="torch")
    with pytest.raises(ValueError, match=r"^sample_and_mix: features must be \(B, H, W, C\)"):
        sample_and_mix(inputs[0][0], *inputs[1:], backend="torch")
    with pytest.raises(ValueError, match=r"^FeatureMap: point_grad_clamp must be positive"):
        FeatureMap(inputs[0], point_grad_clamp=-1.0)


@pytest.mark.parametrize("C, P", [(0, 4), (8, 0)], ids=["C0", "P0"])
def test_nothing_to_mix_gives_zero_gradients(poisoned, device, C, P):
    """P or C of 0: no program runs, and every gradient is the reference's zeros, not an unwritten buffer."""
    for mix_only in (False, True):
        inputs, grad_out = make_inputs(1, 1, 4, 4, C, 2, P, 2, torch.float32, device)
        if mix_only:  # adaptive_mix on its own: x (B, N, P, C) in place of the map and points
            from kernels import adaptive_mix

            x = torch.randn(1, 2, P, C, device=device).requires_grad_(True)
            leaves = [x] + [t.detach().clone().requires_grad_(True) for t in inputs[2:]]
            adaptive_mix(*leaves, backend="triton").backward(grad_out)
        else:
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            sample_and_mix(*leaves, backend="triton").backward(grad_out)
        for leaf in leaves:
            assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(leaf.grad))
