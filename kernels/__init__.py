"""Sparse feature sampling and adaptive mixing: Triton kernels next to their PyTorch references.

Set `TRITON_INTERPRET=1` before importing this package to run the kernels on CPU in Triton's
interpreter. `python -m kernels.benchmark` times each kernel against the PyTorch chain it
replaces; `TRITON_INTERPRET=0 python -m kernels.aot` builds every kernel for sm_90 without a GPU
and reports registers, spills and shared memory.
"""
from .backend import BACKENDS, resolve_backend
from .mixing import adaptive_mix, adaptive_mix_reference
from .sampling import sparse_sample, sparse_sample_reference

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "adaptive_mix",
    "adaptive_mix_reference",
    "sparse_sample",
    "sparse_sample_reference",
]
