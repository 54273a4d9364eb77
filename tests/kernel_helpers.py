"""Shared by the kernel tests: the devices they run on, float64 comparison with per-dtype bounds,
and NaN-poisoned outputs. The fixtures (`device`, `poisoned`, `pin_fp32_matmul`) are registered
for every test module by tests/conftest.py.

Devices: "cpu" when the kernels were built for Triton's interpreter (TRITON_INTERPRET=1, the CPU
suite), "cuda" (marked `gpu`) when they were compiled and a GPU is present
(`TRITON_INTERPRET=0 pytest -m gpu`). References are computed in float64 on the CPU.
"""
import pytest
import torch

from kernels import backend as kbackend

try:  # the property tests' engine; a GPU machine's own python may lack it: then only they skip
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    def given(**_):
        return pytest.mark.skip(reason="hypothesis is not installed")

    def settings(**_):
        return lambda fn: fn

    class st:  # noqa: N801 (stands in for the hypothesis.strategies module)
        @staticmethod
        def integers(*_, **__):
            return None

        sampled_from = integers

# norm-wise relative error bounds against float64 (docs/KERNELS.md, "Tolerances"); fp32 dots are
# pinned to IEEE in these tests (`pin_fp32_matmul`), so the exact-dot fp32 bound holds on GPUs too
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def kernel_devices() -> list:
    if kbackend.triton_interpreter_enabled():
        return [pytest.param("cpu", id="cpu")]
    if torch.cuda.is_available():
        return [pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
    return []


def gpu_when_compiled(fn):
    """The property tests pick their device inside (hypothesis takes no parametrized fixture), so no
    `device` parameter marks them: marked `gpu` here where the kernels run compiled on CUDA, so that
    `pytest -m gpu` runs them there."""
    devices = kernel_devices()
    return pytest.mark.gpu(fn) if devices and devices[0].values[0] == "cuda" else fn


@pytest.fixture(params=kernel_devices())
def device(request):
    return torch.device(request.param)


@pytest.fixture
def pin_fp32_matmul():
    """"highest" fp32 matmul precision: exact fp32 dots in torch and the interpreter, 3xTF32 in the
    compiled kernels (plain TF32 would need the 2e-3 bound)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 on the CPU; an all-zero reference makes it absolute. NaN stays NaN."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(out, ref, tol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten elements?)"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def assert_same_nans_and_close(out, ref, tol, what):
    """NaN exactly where the reference has NaN, and within `tol` elsewhere."""
    out, ref = out.detach().cpu(), ref.detach().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    nan, ref_nan = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan, ref_nan), f"{what}: NaN at {int(nan.sum())} places, the reference at {int(ref_nan.sum())}"
    assert_close(out[~nan], ref[~ref_nan], tol, what)


def to64(*tensors):
    """float64 CPU copies (the reference's inputs)."""
    return [t.detach().double().cpu() for t in tensors]


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel does not write fails the comparison."""
    shapes = []

    def nan_empty(shape, *, dtype, device):
        shapes.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kbackend, "empty_output", nan_empty)
    return shapes


def launch_one_program_too_few(monkeypatch, module, kernel_name: str) -> None:
    """Replace `module.kernel_name` so every launch drops its last program along grid axis 0."""
    real = getattr(module, kernel_name)

    class ShortGrid:  # builds as the real kernel does (kernels.backend.launch asks on a GPU), launches short
        __name__ = real.__name__

        def warmup(self, *args, grid, **kwargs):
            return real.warmup(*args, grid=grid, **kwargs)

        def __getitem__(self, grid):
            return real[(grid[0] - 1,)]

    monkeypatch.setattr(module, kernel_name, ShortGrid())


def break_kernels(monkeypatch, module, *kernel_names: str) -> None:
    """Replace each `module.<kernel_name>` by one whose every launch raises RuntimeError("kernel exploded")."""

    class Broken:
        def warmup(self, *args, **kwargs):  # a GPU's launch builds the configs first (kernels.backend.launch)
            raise RuntimeError("kernel exploded")

        def __getitem__(self, grid):
            raise RuntimeError("kernel exploded")

    for name in kernel_names:
        monkeypatch.setattr(module, name, Broken())
