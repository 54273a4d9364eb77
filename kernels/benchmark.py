"""Kernel benchmarks: each Triton kernel against the PyTorch chain it replaces, at SparseFormer shapes.

    python -m kernels.benchmark --device cuda            # Triton vs reference, both passes
    python -m kernels.benchmark --device cpu --batch-sizes 1 2   # reference only

Every row reports the median time over `repeats` timed calls after warm-up, the minimum bytes
(each input read once, each output written once), the achieved GB/s and the % of the
memory-bandwidth floor (KERNELS.md, "Floors"). On CUDA the L2 cache is flushed before every
timed call and calls are timed with CUDA events. On CPU only the references run (Triton needs
a GPU outside its interpreter, and interpreter timings mean nothing), which every row says.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

import torch

from .mixing import _mix_flops, adaptive_mix, adaptive_mix_reference
from .sampling import sparse_sample, sparse_sample_reference

# Tokens per image for the named variants; every variant samples P = 36 points per token from
# a C = 96 channel, 56 x 56 feature map (stem output at 224 px).
VARIANTS = {"sparseformer_t": 49, "sparseformer_s": 64, "sparseformer_b": 81}
P_POINTS, CHANNELS, MAP_HW = 36, 96, 56
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
H100_BANDWIDTH = 3.0e12  # B/s, the lent H100's measured device-copy bandwidth (KERNELS.md)
CPU_MAX_BATCH = 8  # larger batches are skipped on CPU: the references alone take seconds there


def _sampling_case(B: int, N: int, dtype: torch.dtype, device: str):
    """Inputs and minimum bytes (fwd, bwd) of sparse_sample. Points stay fp32 (token geometry)."""
    features = torch.randn(B, MAP_HW, MAP_HW, CHANNELS, device=device, dtype=dtype)
    points = torch.rand(B, N, P_POINTS, 2, device=device)
    grad_out = torch.randn(B, N, P_POINTS, CHANNELS, device=device, dtype=dtype)
    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    fwd = nbytes(features, points, grad_out)  # map + points read, output (same size as grad_out) written
    bwd = nbytes(grad_out, features, points) + nbytes(features, points)  # + both gradients written
    return (features, points), grad_out, fwd, bwd


def _mixing_case(B: int, N: int, dtype: torch.dtype, device: str):
    """Inputs and minimum bytes (fwd, bwd) of adaptive_mix."""
    P, C = P_POINTS, CHANNELS
    kw = dict(device=device, dtype=dtype)
    inputs = (
        torch.randn(B, N, P, C, **kw),
        torch.randn(B, N, C, C, **kw) / C**0.5,
        torch.randn(C, **kw),
        torch.randn(B, N, P, P, **kw) / P**0.5,
        torch.randn(P, **kw),
    )
    grad_out = torch.randn(B, N, P, C, **kw)
    in_bytes = sum(t.numel() * t.element_size() for t in inputs)
    out_bytes = grad_out.numel() * grad_out.element_size()
    return inputs, grad_out, in_bytes + out_bytes, out_bytes + 2 * in_bytes


def _pass_fn(op: Callable, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor, which: str) -> Callable:
    if which == "fwd":
        def fwd():
            with torch.no_grad():
                op(*inputs)
        return fwd
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]

    def fwd_bwd():
        out = op(*leaves)
        torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out)
    return fwd_bwd


def _time_ms(fn: Callable, device: str, repeats: int, warmup: int) -> float:
    """Median milliseconds of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")  # > the 50 MB L2
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_kernel_benchmarks(
    device: str = "cuda",
    dtypes: Sequence[str] = ("bf16", "fp32"),
    batch_sizes: Sequence[int] = (1, 8, 32, 64, 128, 256),
    variants: Sequence[str] = ("sparseformer_t", "sparseformer_s", "sparseformer_b"),
    repeats: int = 20,
    passes: Sequence[str] = ("fwd", "fwd+bwd"),
    peak_bandwidth: float = H100_BANDWIDTH,
    warmup: int = 3,
) -> list[dict]:
    """Time sparse_sample and adaptive_mix (Triton on CUDA) against their reference chains.

    Reference chains: sampling = F.grid_sample on the channels-last map's NCHW view + permutes
    (`sparse_sample_reference`); mixing = baddbmm + GELU + baddbmm + GELU
    (`adaptive_mix_reference`); both under plain eager autograd for "fwd+bwd".
    Returns one dict per (variant, kernel, pass, dtype, batch, impl).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run_kernel_benchmarks(device='cuda') needs a CUDA device; use device='cpu' for the references")
    unknown = [v for v in variants if v not in VARIANTS] + [d for d in dtypes if d not in DTYPES]
    unknown += [p for p in passes if p not in ("fwd", "fwd+bwd")]
    if unknown:
        raise ValueError(f"unknown variants/dtypes/passes {unknown}; known: {list(VARIANTS)}, {list(DTYPES)}, "
                         "['fwd', 'fwd+bwd']")
    on_gpu = device == "cuda"
    if not on_gpu:
        batch_sizes = [b for b in batch_sizes if b <= CPU_MAX_BATCH]
    note = "" if on_gpu else "CPU: reference only, Triton needs a GPU"
    kernels = {
        "sparse_sample": (
            _sampling_case,
            lambda f, p: sparse_sample(f, p, backend="triton"),
            sparse_sample_reference,
        ),
        "adaptive_mix": (
            _mixing_case,
            lambda *a: adaptive_mix(*a, backend="triton"),
            adaptive_mix_reference,
        ),
    }
    rows = []
    for variant in variants:
        N = VARIANTS[variant]
        for dtype_name in dtypes:
            for B in batch_sizes:
                for kernel, (case, triton_op, ref_op) in kernels.items():
                    inputs, grad_out, fwd_bytes, bwd_bytes = case(B, N, DTYPES[dtype_name], device)
                    flops = _mix_flops(B, N, P_POINTS, CHANNELS) if kernel == "adaptive_mix" else None
                    for which in passes:
                        floor_bytes = fwd_bytes if which == "fwd" else fwd_bytes + bwd_bytes
                        impls = {"reference": ref_op, **({"triton": triton_op} if on_gpu else {})}
                        times = {}
                        for impl, op in impls.items():
                            times[impl] = _time_ms(_pass_fn(op, inputs, grad_out, which), device, repeats, warmup)
                            seconds = times[impl] * 1e-3
                            rows.append(dict(
                                variant=variant, kernel=kernel, **{"pass": which}, dtype=dtype_name, batch=B,
                                tokens=N, points=P_POINTS, channels=CHANNELS, impl=impl, device=device,
                                time_ms=times[impl], time_us=times[impl] * 1e3, floor_bytes=floor_bytes,
                                floor_us=floor_bytes / peak_bandwidth * 1e6,
                                gbps=floor_bytes / seconds / 1e9,
                                pct_of_floor=100 * floor_bytes / peak_bandwidth / seconds,
                                tflops=None if flops is None else (flops if which == "fwd" else 3 * flops)
                                / seconds / 1e12,
                                speedup_vs_reference=times["reference"] / times[impl],
                                note=note,
                            ))
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Fixed-width text table of `run_kernel_benchmarks` rows."""
    cols = [("variant", "{}"), ("kernel", "{}"), ("pass", "{}"), ("dtype", "{}"), ("batch", "{}"),
            ("impl", "{}"), ("time_us", "{:.1f}"), ("floor_us", "{:.1f}"), ("gbps", "{:.1f}"),
            ("pct_of_floor", "{:.1f}"), ("speedup_vs_reference", "{:.2f}"), ("note", "{}")]
    cells = [[name for name, _ in cols]]
    cells += [[fmt.format(r[name]) for name, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-bandwidth", type=float, default=H100_BANDWIDTH, help="B/s for the floor")
    args = parser.parse_args(argv)
    if args.device != "cuda":
        print(f"device={args.device}: timing the PyTorch references only (batch <= {CPU_MAX_BATCH}); "
              "the Triton kernels need a GPU")
    rows = run_kernel_benchmarks(
        device=args.device, dtypes=args.dtypes, batch_sizes=args.batch_sizes, variants=args.variants,
        repeats=args.repeats, passes=args.passes, peak_bandwidth=args.peak_bandwidth,
    )
    print(f"floor = minimum bytes / {args.peak_bandwidth:.2e} B/s; time = median of {args.repeats} after warm-up")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
