"""The one dispatch point between the Triton kernels and the PyTorch references.

`backend="auto"` picks Triton for CUDA tensors and the reference otherwise;
`"triton"` on CPU tensors is allowed only under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how the CPU test-suite exercises the kernels.
"""
from __future__ import annotations

import os

import torch
import triton.language as tl

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map `auto|triton|torch` to the implementation that will run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device}); on CPU use backend='torch' "
            "or set TRITON_INTERPRET=1 before importing `kernels` to run the kernels in Triton's interpreter"
        )
    return backend


def check_inputs(op: str, **tensors: torch.Tensor) -> None:
    """Same device and same floating dtype for every tensor of one op, or a ValueError naming them."""
    items = list(tensors.items())
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {name0} is on {t0.device}; move them to one device")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.dtype != t0.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but {name0} is {t0.dtype}; cast them to one dtype")


def empty_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a buffer that a kernel must write in full.

    Every kernel output goes through this one function so the tests can swap it for a
    NaN-filled allocation and catch elements a kernel leaves unwritten.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def compute_dtype(*tensors: torch.Tensor):
    """Triton compute dtype: fp64 inputs stay fp64 (so gradcheck runs on the kernels), the rest run in fp32.

    fp16/bf16 are upcast right after `tl.load` (bf16 arithmetic is wrong in Triton's interpreter).
    """
    return tl.float64 if any(t.dtype == torch.float64 for t in tensors) else tl.float32
