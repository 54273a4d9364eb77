"""Sparse feature sampling, adaptive mixing and the two fused: Triton kernels next to their
PyTorch references (docs/KERNELS.md).

Set `TRITON_INTERPRET=1` before importing this package to run the kernels on CPU in Triton's
interpreter. `python -m kernels.benchmark` times each kernel against the PyTorch chain it
replaces; `python -m kernels.aot --arch 80,86,89,90` builds every kernel for those GPUs without
one and reports registers, spills and shared memory; `python -m kernels.validate` checks and
times everything on a CUDA GPU.
"""
from .backend import BACKENDS, resolve_backend
from .fused import FeatureMap, sample_and_mix, sample_and_mix_reference
from .mixing import adaptive_mix, adaptive_mix_reference
from .sampling import sparse_sample, sparse_sample_reference

__all__ = [
    "BACKENDS",
    "resolve_backend",
    "FeatureMap",
    "adaptive_mix",
    "adaptive_mix_reference",
    "sample_and_mix",
    "sample_and_mix_reference",
    "sparse_sample",
    "sparse_sample_reference",
]
