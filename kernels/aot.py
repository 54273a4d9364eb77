"""Ahead-of-time build of every kernel for CUDA targets, without a GPU.

    python -m kernels.aot --arch 80,86,89,90          # A100, RTX 30xx/A10, RTX 40xx/L4/L40S, H100/H200
    python -m kernels.aot --arch 90 --dtypes bf16 --json aot.json

The kernels are compiled by Triton's own JIT path (`JITFunction.run(..., warmup=True)`) from the
real host wrappers called on CPU tensors of SparseFormer-T's shapes (B = 2, 49 tokens, P = 36,
C = 96, a 56 x 56 map; 8 frames for the video kernels), with a stand-in driver that reports the
chosen arch. So every kernel gets exactly the specialization a launch on that GPU would give it
(16-divisible pointers and ints, value-1 constexprs) and the launch configuration picked for that
arch's shared memory (kernels.backend.target). The full pipeline runs (TTIR -> TTGIR -> LLVM ->
PTX -> cubin with the ptxas in the triton wheel) and this prints registers, spilled bytes, shared
memory and the global atomics of the SASS (fenced `ATOMG` vs fire-and-forget `RED`) per kernel.

Exits non-zero when a kernel needs more shared memory than its arch allows per block or a
16-bit kernel spills registers. It says nothing about speed. Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from . import backend as _backend

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
KERNELS = ("sparse_sample_fwd_kernel", "sparse_sample_bwd_kernel", "adaptive_mix_fwd_kernel",
           "adaptive_mix_bwd_kernel", "sample_mix_fwd_kernel", "sample_mix_bwd_kernel")


class _OfflineDriver:
    """The parts of a Triton driver that compiling (not launching) a kernel asks for."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def check_launch_args(name: str, args) -> None:
    """Refuses a Python float among a launch's arguments: the compiled JIT types it fp32 (triton 3.9's
    interpreter keeps it a Python float, so the CPU suite does not see the rounding), which would round
    e.g. a float64 gradient clamp. Float64 values travel as their bits (`sampling.clamp_bits`)."""
    floats = [i for i, a in enumerate(args) if isinstance(a, float)]
    if floats:
        raise TypeError(f"{name}: Python float arguments at positions {floats} would be rounded to fp32 when "
                        "compiled; pass a float64 as its int64 bits (kernels.sampling.clamp_bits)")


class _Capture:
    """Stands in for a @triton.jit kernel in its module: `kernel[grid](...)` compiles and records."""

    def __init__(self, fn, sink: list):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            check_launch_args(self.fn.__name__, args)
            self.sink.append((self.fn.__name__, self.fn.run(*args, grid=grid, warmup=True, **kwargs), kwargs))
        return launch

    def warmup(self, *args, grid, **kwargs):
        """A build only, not recorded: `backend.launch` asks it whether a config fits."""
        return self.fn.run(*args, grid=grid, warmup=True, **kwargs)


@contextlib.contextmanager
def kernels_replaced(stand_in):
    """Within: every kernel of KERNELS in kernels.sampling / mixing / fused is `stand_in(kernel)`, so
    the host wrappers' `kernel[grid](...)` calls reach it; restored on exit."""
    from . import fused, mixing, sampling

    saved = {(m, name): getattr(m, name) for m in (sampling, mixing, fused) for name in KERNELS if hasattr(m, name)}
    try:
        for (m, name), fn in saved.items():
            setattr(m, name, stand_in(fn))
        yield
    finally:
        for (m, name), fn in saved.items():
            setattr(m, name, fn)


@contextlib.contextmanager
def offline_build(arch: int, sink: list):
    """Within: host wrappers compile their kernels for sm_{arch} into `sink` instead of launching them."""
    from triton.runtime.driver import driver

    if _backend.triton_interpreter_enabled():
        raise RuntimeError("kernels.aot compiles for a GPU: run it with TRITON_INTERPRET unset "
                           "(e.g. TRITON_INTERPRET=0 python -m kernels.aot)")
    built = []

    def capture(fn):
        fn.device_caches.clear()  # the binder caches the target per device
        built.append(fn)
        return _Capture(fn, sink)

    previous = driver._active  # None, or a real driver: restored as it was (there may be no GPU driver)
    driver.set_active(_OfflineDriver(arch))
    try:
        with kernels_replaced(capture), _backend.use_target(_backend.target_for_arch(arch)):
            yield
    finally:
        for fn in built:
            fn.device_caches.clear()
        driver._active = previous


def _nvidia_tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found at {path}: this triton wheel does not ship the NVIDIA tools")
    return path


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spilled bytes) from `ptxas -v`, with the ptxas that Triton itself uses for `arch`."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # e.g. sm_90a
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        log = subprocess.run([get_ptxas(arch).path, f"-arch={target}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        if log.returncode:
            raise RuntimeError(f"ptxas failed on the generated PTX:\n{log.stderr}")
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log.stderr)
    spills = re.search(r"(\d+) bytes spill stores", log.stderr)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def sass_atomics(cubin: bytes) -> dict:
    """Global atomics and GPU-wide fences in the SASS: `RED` (no value returned: fire-and-forget),
    `ATOMG` (returns a value), `MEMBAR...GPU` (the fences an acq_rel atomic sits between; block-level
    `MEMBAR.ALL.CTA` around shared-memory exchanges is not counted)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    return {"red": len(re.findall(r"\bREDG?\.", sass)), "atomg": len(re.findall(r"\bATOMG\.", sass)),
            "membar_gpu": len(re.findall(r"\bMEMBAR\.\S*GPU", sass))}


def kernel_facts(name: str, kernel, arch: int, dtype: str, variant: str, num_warps: int) -> dict:
    """One report row for a compiled kernel (a triton CompiledKernel)."""
    regs, spills = _ptxas_stats(kernel.asm["ptx"], arch)
    limit = _backend.SHARED_BYTES[arch]
    shared = int(kernel.metadata.shared)
    row = dict(kernel=name, variant=variant, dtype=dtype, arch=f"sm_{arch}", num_warps=num_warps, registers=regs,
               spill_bytes=spills, shared_bytes=shared, shared_limit=limit, fits=shared <= limit,
               **sass_atomics(kernel.asm["cubin"]))
    row["ok"] = row["fits"] and not (dtype in ("bf16", "fp16") and spills > 0)
    return row


def _calls(dtype: torch.dtype, ndim: int, P: int = 36, C: int = 96):
    """The host-wrapper calls that launch every kernel once at SparseFormer-T's shapes (or P points
    and C channels)."""
    from . import fused, mixing, sampling

    B, N, HW, T = 2, 49, 56, 8
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    fmap = torch.zeros((B, HW, HW, C) if ndim == 2 else (B, T, HW, HW, C), dtype=dtype)
    points = torch.zeros(B, N, P, ndim, dtype=pdt)
    x = torch.zeros(B, N, P, C, dtype=dtype)
    params = torch.zeros(B, N, C * C + P * P, dtype=dtype)
    bc, bs = torch.zeros(C, dtype=dtype), torch.zeros(P, dtype=dtype)
    acc = torch.zeros(fmap.shape, dtype=_backend.accumulate_dtype(dtype))
    clamp = [1.0 / HW] * ndim
    yield lambda: sampling.sparse_sample_fwd(fmap, points, "triton")
    yield lambda: sampling.sparse_sample_bwd(x, fmap, points, acc, clamp, "triton")
    if ndim == 2:
        yield lambda: mixing.adaptive_mix_fwd(x, params, bc, bs, "triton")
        yield lambda: mixing.adaptive_mix_bwd(x, x, params, bc, bs, "triton")
    yield lambda: fused.sample_and_mix_fwd(fmap, points, params, bc, bs, "triton")
    yield lambda: fused.sample_and_mix_bwd(x, fmap, points, params, bc, bs, acc, clamp, "triton")


def build_all(arch: int = 90, dtypes=tuple(DTYPES), ndims=(2, 3), P: int = 36, C: int = 96,
              failures: list | None = None) -> list[dict]:
    """Compile every kernel for sm_{arch}, for each input dtype and map dimensionality; one dict each.
    A launch for which no config fits (`backend.launch`'s RuntimeError) is appended to `failures`
    (raised when that is None)."""
    rows = []
    for dt in dtypes:
        for ndim in ndims:
            sink: list = []
            with offline_build(arch, sink):
                for call in _calls(DTYPES[dt], ndim, P, C):
                    try:
                        call()
                    except RuntimeError as e:
                        if failures is None or "no launch configuration fits" not in str(e):
                            raise
                        failures.append(f"sm_{arch} {dt} {ndim}d: {e}")
            for name, kernel, kwargs in sink:
                row = kernel_facts(name, kernel, arch, dt, f"{ndim}d", kwargs.get("num_warps", 4))
                row["dot"] = kwargs.get("DOT_PRECISION", "-")  # the chosen config's (backend.launch)
                rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        flag = "" if r["ok"] else "  <-- " + ("over the shared-memory limit" if not r["fits"] else "16-bit spills")
        lines.append(f"{r['arch']:6s} {r['kernel']:26s} {r['variant']} {r['dtype']:5s} warps={r['num_warps']} "
                     f"dot={r.get('dot', '-'):6s} "
                     f"regs={r['registers']:3d} spill={r['spill_bytes']:5d} B shared={r['shared_bytes']:6d}/"
                     f"{r['shared_limit']} B atomics: red={r['red']} atomg={r['atomg']} "
                     f"gpu-fences={r['membar_gpu']}{flag}")
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    """One Markdown table per dtype: a row per kernel and variant, a column per arch, each cell
    registers / spilled bytes / shared memory in KB of the arch's per-block limit / `RED` atomics
    (the tables of docs/BENCHMARKS.md)."""
    archs = list(dict.fromkeys(r["arch"] for r in rows))
    out = []
    for dt in dict.fromkeys(r["dtype"] for r in rows):
        cells = {}
        for r in rows:
            if r["dtype"] == dt:
                cells.setdefault((r["kernel"], r["variant"]), {})[r["arch"]] = (
                    f"{r['registers']} / {r['spill_bytes']} / {r['shared_bytes'] / 1024:.1f} of "
                    f"{r['shared_limit'] // 1024} / {r['red']}")
        out += [f"{dt}: registers / spilled bytes / shared memory (KB, of the arch's per-block limit) / `RED` "
                "atomics, per arch", "", "| kernel | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
        out += [f"| `{kernel}` {variant} | " + " | ".join(per_arch.get(a, "-") for a in archs) + " |"
                for (kernel, variant), per_arch in cells.items()]
        out.append("")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    # triton 3.9 warns when this is unset; 1 is its default and triton 3.6's behaviour
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="comma-separated compute capabilities, e.g. 80,86,89,90")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: bf16,fp16,fp32,fp64")
    parser.add_argument("--points", type=int, default=36, help="sampling points per token, P (SparseFormer: 36)")
    parser.add_argument("--channels", type=int, default=96, help="feature-map channels, C (SparseFormer-T: 96)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--markdown", default=None, help="also write per-dtype Markdown tables to this file")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    dtypes = args.dtypes.split(",")
    unknown = [a for a in archs if a not in _backend.SHARED_BYTES] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown arch/dtype {unknown}; archs: {sorted(_backend.SHARED_BYTES)}, dtypes: {list(DTYPES)}")
    print(f"triton {triton.__version__}, torch {torch.__version__}; P={args.points}, C={args.channels}, 56x56 map"
          + (" (SparseFormer-T's shapes)" if (args.points, args.channels) == (36, 96) else ""))
    rows, failures = [], []
    for arch in archs:
        rows += build_all(arch, dtypes, P=args.points, C=args.channels, failures=failures)
        print(format_rows([r for r in rows if r["arch"] == f"sm_{arch}"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(rows))
    bad = [r for r in rows if not r["ok"]]
    print("\n".join(failures))
    print(f"{len(rows)} kernels built, {len(bad)} over a limit, {len(failures)} with no config that fits")
    if bad or failures:
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
