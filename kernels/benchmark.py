"""Kernel benchmarks: each Triton op against the eager PyTorch chain it replaces, at SparseFormer shapes.

    python -m kernels.benchmark --device cuda                    # Triton vs reference, both passes
    python -m kernels.benchmark --device cpu --batch-sizes 1 2   # reference only

Shapes come from the model's own variants (model/sparseformer.py VARIANTS: tokens, points,
channels) with the stem's 56 x 56 map at 224 px. Every row reports the median time over `repeats`
timed calls after warm-up, the minimum bytes (each input read once, each output written once), the
achieved GB/s and, on a GPU, the % of the memory-bandwidth floor (docs/KERNELS.md, "Floors"; the
bandwidth is a measured device copy, `measure_copy_bandwidth`, unless given). On CUDA the L2
cache is flushed before every timed call and calls are timed with CUDA events. On CPU only the
references run (Triton needs a GPU outside its interpreter, and interpreter timings mean nothing),
which every row says; no % of floor is given there.

Reference chains, under eager autograd for "fwd+bwd": sampling = F.grid_sample on the
channels-last map's NCHW view + permutes; mixing = baddbmm + GELU + baddbmm + GELU; fused = both.
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .fused import sample_and_mix, sample_and_mix_reference
from .mixing import adaptive_mix, adaptive_mix_reference, mix_flops
from .sampling import sparse_sample, sparse_sample_reference

MAP_HW = 56  # the stem's output at 224 px
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_MAX_BATCH = 8  # larger batches are skipped on CPU: the references alone take seconds there
KERNELS = ("sparse_sample", "adaptive_mix", "sample_and_mix")


def variant_shapes(name: str) -> tuple[int, int, int]:
    """(tokens N, points P, channels C) of a registered SparseFormer variant."""
    from model.sparseformer import VARIANTS, SparseFormer

    if name not in VARIANTS:
        raise ValueError(f"unknown SparseFormer variant {name!r}; known: {sorted(VARIANTS)}")
    defaults = {k: v.default for k, v in inspect.signature(SparseFormer.__init__).parameters.items()}
    cfg = {**defaults, **VARIANTS[name]}
    return cfg["num_tokens"], cfg["num_points"], cfg["conv_dim"]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_case(kernel: str, B: int, N: int, P: int, C: int, dtype: torch.dtype, device: str):
    """(inputs, grad_out, forward floor bytes, backward floor bytes) of one op. Points stay fp32."""
    kw = dict(device=device, dtype=dtype)
    features = torch.randn(B, MAP_HW, MAP_HW, C, **kw)
    points = torch.rand(B, N, P, 2, device=device)
    x = torch.randn(B, N, P, C, **kw)
    params = torch.cat([torch.randn(B, N, C * C, **kw) / C**0.5, torch.randn(B, N, P * P, **kw) / P**0.5], dim=-1)
    bc, bs = torch.randn(C, **kw), torch.randn(P, **kw)
    grad_out = torch.randn(B, N, P, C, **kw)
    fp32_map = features.numel() * 4  # the map gradient is accumulated in fp32
    if kernel == "sparse_sample":
        inputs = (features, points)
        fwd = nbytes(features, points, grad_out)
        bwd = nbytes(grad_out, features, points) + fp32_map + nbytes(points)
    elif kernel == "adaptive_mix":
        inputs = (x, params, bc, bs)
        fwd = nbytes(*inputs, grad_out)
        bwd = nbytes(grad_out, *inputs) + nbytes(*inputs)
    else:
        inputs = (features, points, params, bc, bs)
        fwd = nbytes(*inputs, grad_out)
        bwd = nbytes(grad_out, *inputs) + fp32_map + nbytes(points, params, bc, bs)
    return inputs, grad_out, fwd, bwd


def _ops(kernel: str) -> tuple[Callable, Callable]:
    """(Triton op, eager reference chain) of a kernel."""
    if kernel == "sparse_sample":
        return (lambda f, p: sparse_sample(f, p, backend="triton")), sparse_sample_reference
    if kernel == "adaptive_mix":
        return (lambda *a: adaptive_mix(*a, backend="triton")), adaptive_mix_reference
    return (lambda *a: sample_and_mix(*a, backend="triton")), sample_and_mix_reference


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


def measure_copy_bandwidth(device: str = "cuda", mib: int = 1024, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in B/s (read + write counted), the floors' denominator."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, repeats, warmup=3)
    return 2 * src.numel() / (ms * 1e-3)


def run_kernel_benchmarks(
    device: str = "cuda",
    dtypes: Sequence[str] = ("bf16", "fp32"),
    batch_sizes: Sequence[int] = (1, 8, 32, 64, 128, 256),
    variants: Sequence[str] = ("sparseformer_t", "sparseformer_s", "sparseformer_b"),
    repeats: int = 20,
    passes: Sequence[str] = ("fwd", "fwd+bwd"),
    peak_bandwidth: float | None = None,
    warmup: int = 3,
    kernels: Sequence[str] = KERNELS,
) -> list[dict]:
    """Time each op (Triton on CUDA) against its reference chain. peak_bandwidth: B/s for the floor
    (measured on the device when None; no floor on CPU). Returns one dict per (variant, kernel,
    pass, dtype, batch, impl)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run_kernel_benchmarks(device='cuda') needs a CUDA device; "
                         "use device='cpu' for the references")
    unknown = [d for d in dtypes if d not in DTYPES] + [p for p in passes if p not in ("fwd", "fwd+bwd")]
    unknown += [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown dtypes/passes/kernels {unknown}; known: {list(DTYPES)}, ['fwd', 'fwd+bwd'], "
                         f"{list(KERNELS)}")
    shapes = {v: variant_shapes(v) for v in variants}
    on_gpu = device == "cuda"
    if not on_gpu:
        batch_sizes = [b for b in batch_sizes if b <= CPU_MAX_BATCH]
    elif peak_bandwidth is None:
        peak_bandwidth = measure_copy_bandwidth(device)
    note = "" if on_gpu else "CPU: reference only, Triton needs a GPU"
    rows = []
    for variant, (N, P, C) in shapes.items():
        for dtype_name in dtypes:
            for B in batch_sizes:
                for kernel in kernels:
                    inputs, grad_out, fwd_bytes, bwd_bytes = make_case(kernel, B, N, P, C, DTYPES[dtype_name], device)
                    flops = mix_flops(B, N, P, C) if kernel != "sparse_sample" else None
                    triton_op, ref_op = _ops(kernel)
                    for which in passes:
                        floor_bytes = fwd_bytes if which == "fwd" else fwd_bytes + bwd_bytes
                        impls = {"reference": ref_op, **({"triton": triton_op} if on_gpu else {})}
                        times = {}
                        for impl, op in impls.items():
                            times[impl] = _time_ms(_pass_fn(op, inputs, grad_out, which), device, repeats, warmup)
                            seconds = times[impl] * 1e-3
                            floor_s = floor_bytes / peak_bandwidth if on_gpu else None
                            rows.append(dict(
                                variant=variant, kernel=kernel, **{"pass": which}, dtype=dtype_name, batch=B,
                                tokens=N, points=P, channels=C, impl=impl, device=device,
                                time_ms=times[impl], time_us=times[impl] * 1e3, floor_bytes=floor_bytes,
                                floor_us=None if floor_s is None else floor_s * 1e6,
                                gbps=floor_bytes / seconds / 1e9,
                                pct_of_floor=None if floor_s is None else 100 * floor_s / seconds,
                                tflops=None if flops is None else (flops if which == "fwd" else 3 * flops)
                                / seconds / 1e12,
                                speedup_vs_reference=times["reference"] / times[impl],
                                note=note,
                            ))
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Fixed-width text table of `run_kernel_benchmarks` rows ("-" where a value does not apply)."""
    cols = [("variant", "{}"), ("kernel", "{}"), ("pass", "{}"), ("dtype", "{}"), ("batch", "{}"),
            ("impl", "{}"), ("time_us", "{:.1f}"), ("floor_us", "{:.1f}"), ("gbps", "{:.1f}"),
            ("pct_of_floor", "{:.1f}"), ("speedup_vs_reference", "{:.2f}"), ("note", "{}")]
    cells = [[name for name, _ in cols]]
    cells += [["-" if r[name] is None else fmt.format(r[name]) for name, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--variants", nargs="+", default=["sparseformer_t", "sparseformer_s", "sparseformer_b"])
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS))
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-bandwidth", type=float, default=None, help="B/s for the floor (default: measured)")
    args = parser.parse_args(argv)
    if args.device != "cuda":
        print(f"device={args.device}: timing the PyTorch references only (batch <= {CPU_MAX_BATCH}); "
              "the Triton kernels need a GPU")
    rows = run_kernel_benchmarks(
        device=args.device, dtypes=args.dtypes, batch_sizes=args.batch_sizes, variants=args.variants,
        repeats=args.repeats, passes=args.passes, peak_bandwidth=args.peak_bandwidth, kernels=args.kernels,
    )
    print(f"time = median of {args.repeats} after warm-up")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
