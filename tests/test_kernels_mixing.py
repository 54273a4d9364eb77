"""Mixing kernel (Triton: the interpreter on CPU, compiled on a GPU) against the float64 PyTorch reference."""
import pytest
import torch

from kernel_helpers import (
    TOL,
    assert_close,
    break_kernels,
    given,
    gpu_when_compiled,
    kernel_devices,
    launch_one_program_too_few,
    settings,
    st,
    to64,
)
from kernels import mixing
from kernels.mixing import (
    adaptive_mix,
    adaptive_mix_bwd,
    adaptive_mix_reference,
    adaptive_mix_reference_backward,
    padded_mix_flops,
    row_blocks,
)

NAMES = ("x", "params", "channel_bias", "spatial_bias")

pytestmark = pytest.mark.usefixtures("pin_fp32_matmul")  # fp32 at "highest": the 1e-5 bound


def make_inputs(B, N, P, C, dtype, device="cpu"):
    """Generated weights scaled like the model's so activations stay O(1); biases large enough that
    GELU(bias) in padded rows would visibly corrupt the spatial mix."""
    x = torch.randn(B, N, P, C)
    params = torch.cat([(torch.randn(B, N, C, C) / C**0.5).flatten(2), (torch.randn(B, N, P, P) / P**0.5).flatten(2)],
                       dim=-1)
    bc = torch.randn(C)
    bs = torch.randn(P) * 2
    grad_out = torch.randn(B, N, P, C)
    return [t.to(dtype).to(device) for t in (x, params, bc, bs)], grad_out.to(dtype).to(device)


def run_both(inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = adaptive_mix(*leaves, backend="triton")
    out.backward(grad_out)
    ref_in = to64(*inputs)
    ref = adaptive_mix_reference(*ref_in)
    ref_grads = adaptive_mix_reference_backward(to64(grad_out)[0], *ref_in)
    return (out, *[t.grad for t in leaves]), (ref, *ref_grads)


def check_all(got, ref, tol):
    for o, r, what in zip(got, ref, ("forward", *(f"grad {n}" for n in NAMES)), strict=True):
        assert_close(o, r, tol, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 2, 9, 40), (2, 1, 25, 24), (1, 2, 36, 20)], ids=["P9C40", "P25C24", "P36C20"])
def test_matches_reference(poisoned, device, dtype, shape):
    inputs, grad_out = make_inputs(*shape, dtype, device)
    got, ref = run_both(inputs, grad_out)
    assert poisoned, "the kernel outputs did not go through the poisoned allocator"
    assert all(t.dtype == dtype for t in got)
    check_all(got, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paper_shape(poisoned, device, dtype):
    """P = 36, C = 96: row blocks 32 + 16, three 32-channel output blocks."""
    inputs, grad_out = make_inputs(1, 1, 36, 96, dtype, device)
    got, ref = run_both(inputs, grad_out)
    check_all(got, ref, TOL[dtype])


def test_two_row_blocks_of_different_sizes(poisoned, device):
    """P = 81 -> 64 + 32 rows: the cross terms of the spatial mix between blocks."""
    inputs, grad_out = make_inputs(1, 1, 81, 16, torch.float32, device)
    check_all(*run_both(inputs, grad_out), TOL[torch.float32])


def test_float64_runs_in_float64(poisoned, device):
    inputs, grad_out = make_inputs(1, 2, 7, 20, torch.float64, device)
    check_all(*run_both(inputs, grad_out), TOL[torch.float64])


def test_gradcheck_float64(device):
    inputs, _ = make_inputs(1, 2, 5, 6, torch.float64, device)
    inputs = [t.requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: adaptive_mix(*a, backend="triton"), inputs, fast_mode=True)


def test_non_contiguous_inputs(poisoned, device):
    B, N, P, C = 2, 2, 9, 24
    x = torch.randn(B, P, N, C, device=device).transpose(1, 2)
    params = make_inputs(N, B, P, C, torch.float32, device)[0][1].transpose(0, 1)  # (B, N, K) of (N, B, K) memory
    bc = torch.randn(2 * C, device=device)[::2]
    bs = torch.randn(P, 3, device=device)[:, 1]
    grad_out = torch.randn(B, N, C, P, device=device).transpose(-1, -2)
    inputs = [x, params, bc, bs]
    assert not any(t.is_contiguous() for t in inputs + [grad_out])
    out = mixing.adaptive_mix_fwd(*inputs, "triton")
    grads = adaptive_mix_bwd(grad_out, *inputs, "triton")
    ref_in = to64(*inputs)
    check_all((out, *grads), (adaptive_mix_reference(*ref_in),
                              *adaptive_mix_reference_backward(to64(grad_out)[0], *ref_in)), 1e-5)


def test_backward_writes_one_generator_gradient(device):
    """The op takes the generator output whole; its backward returns one (B, N, C*C + P*P) gradient."""
    inputs, grad_out = make_inputs(2, 3, 9, 8, torch.float32, device)
    grads = adaptive_mix_bwd(grad_out, *inputs, "triton")
    assert grads[1].shape == (2, 3, 8 * 8 + 9 * 9) and grads[1].is_contiguous()


def test_row_blocks_and_padded_flops():
    assert [row_blocks(p) for p in (9, 16, 25, 36, 49, 64, 81, 100, 144)] == [
        (16, 0), (16, 0), (32, 0), (32, 16), (64, 0), (64, 0), (64, 32), (64, 64), (128, 16)]
    useful, executed = padded_mix_flops(36, 96)  # SparseFormer-T/S/B
    assert executed / useful == pytest.approx(1.78, abs=0.01)  # was 2.6 with P padded to 64 and 16-wide blocks


@gpu_when_compiled
@settings(max_examples=6, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), N=st.integers(1, 2), P=st.integers(1, 40), C=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_random_shapes(B, N, P, C, seed):
    devices = kernel_devices()
    if not devices:
        pytest.skip("no device runs the Triton kernels here")
    torch.manual_seed(seed)
    inputs, grad_out = make_inputs(B, N, P, C, torch.float32, devices[0].values[0])
    check_all(*run_both(inputs, grad_out), 1e-5)


def test_bitwise_reproducible(device):
    """No atomics in the mixing kernels: forward and every gradient equal bit for bit run to run."""
    inputs, grad_out = make_inputs(2, 3, 36, 24, torch.float32, device)
    first, second = run_both(inputs, grad_out)[0], run_both(inputs, grad_out)[0]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_poisoning_catches_unwritten_elements(poisoned, device, monkeypatch):
    """Launch one program too few: the last token stays NaN, and the check must see it."""
    launch_one_program_too_few(monkeypatch, mixing, "adaptive_mix_fwd_kernel")
    inputs, _ = make_inputs(1, 2, 9, 24, torch.float32, device)
    out = adaptive_mix(*inputs, backend="triton")
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(out, adaptive_mix_reference(*to64(*inputs)), 1e-5, "forward")


def test_triton_failure_is_not_swallowed(device, monkeypatch):
    break_kernels(monkeypatch, mixing, "adaptive_mix_fwd_kernel", "adaptive_mix_bwd_kernel")
    inputs, grad_out = make_inputs(1, 1, 4, 8, torch.float32, device)
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
        (_bad(1, torch.randn(1, 2, 64)), "params must have shape"),
        (_bad(2, torch.randn(4)), "channel_bias must have shape"),
        (_bad(3, torch.randn(8)), "spatial_bias must have shape"),
        (_bad(1, torch.randn(1, 2, 80, dtype=torch.float64)), "cast them to one dtype"),
        (_bad(2, torch.randn(8, dtype=torch.float16)), "cast them to one dtype"),
        (_bad(3, torch.randn(4, device="meta")), "one device"),
        (_bad(0, torch.ones(1, 2, 4, 8, dtype=torch.int32)), "must be float16"),
    ],
)
def test_value_errors(inputs, match):
    with pytest.raises(ValueError, match=match):
        adaptive_mix(*inputs, backend="triton")
