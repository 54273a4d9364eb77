"""Shared by the kernel tests: float64 comparison with per-dtype bounds, and NaN-poisoned outputs."""
import pytest
import torch

from kernels import backend as kbackend

# norm-wise relative error bounds against float64 (docs/KERNELS.md, "Tolerances")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; an all-zero reference makes it absolute. NaN stays NaN."""
    diff = (out.double() - ref.double()).norm()
    return (diff / ref.double().norm().clamp_min(1e-300)).item()


def assert_close(out, ref, tol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten elements?)"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


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

    class ShortGrid:
        def __getitem__(self, grid):
            return real[(grid[0] - 1,)]

    monkeypatch.setattr(module, kernel_name, ShortGrid())


def break_kernels(monkeypatch, module, *kernel_names: str) -> None:
    """Replace each `module.<kernel_name>` by one whose every launch raises RuntimeError("kernel exploded")."""

    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("kernel exploded")

    for name in kernel_names:
        monkeypatch.setattr(module, name, Broken())
