"""GPU validation in one command: build facts, correctness, determinism, the whole model, timings.

    python -m kernels.validate --out outputs/validate        # on one CUDA GPU, < 8 minutes
    make validate
    python -m kernels.validate --sections correctness,model  # a subset (names below), in this order

Sections, each written to <out>/validate.json and <out>/validate.md as soon as it ends (so a run
cut off by a time limit still reports what it did):
  environment    versions, the device, its shared memory per block
  bandwidth      measured device-to-device copy bandwidth: the floor's denominator
  build          registers, spills, shared memory and the SASS's global atomics (relaxed RED vs
                 fenced ATOMG + GPU MEMBAR) of every kernel as the JIT built it on this device
  correctness    every op and dtype on the device against the float64 CPU reference: 2-D and
                 3-D sampling, mixing, fused; NaN/inf points; a contention stress (all points of
                 a token in one 2 x 2 cell)
  determinism    use_deterministic_algorithms(True) refuses the atomic backward; forward and
                 every gradient but the map's are bitwise equal run to run (the map's drift is shown)
  model          SparseFormer-T, backend="triton" against "torch": logits and every gradient in
                 fp32 and bf16 autocast, and under torch.compile and CUDA-graph capture
  timings        kernels.benchmark at B = 8, 32, 128 in fp32 and bf16 against the eager chains and
                 the floors, with the targets of docs/KERNELS.md
  training_step  SparseFormer-T at B = 128 in bf16: step time and max_memory_allocated, triton vs torch

Without a GPU (TRITON_INTERPRET=1, the CPU test-suite) it runs the interpreter-feasible parts on
tiny shapes (correctness, determinism, model with a tiny SparseFormer) and lists what it skipped.
Exits non-zero when a check fails (timings below a target are reported, not failures).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from . import backend as _backend

TARGETS = {  # docs/KERNELS.md, "Targets": (kernel, pass) -> (what, bound)
    ("sparse_sample", "fwd"): ("% of copy bandwidth", 60.0),
    ("sparse_sample", "fwd+bwd"): ("x the grid_sample path", 3.0),
    ("adaptive_mix", "fwd+bwd"): ("x the baddbmm chain", 1.5),
    ("sample_and_mix", "fwd+bwd"): ("x the eager chain", 2.0),
}


class Report:
    """Sections with a status, written out after each one."""

    def __init__(self, out: Path):
        self.out, self.sections = out, []
        out.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn, skip_reason: str | None = None) -> None:
        """Run one section and write the report. Ctrl-C (a time cap's SIGINT) inside it is written
        as an `interrupted` section with where it was, and then raised: the run stops, reported."""
        start = time.perf_counter()
        interrupted = None
        if skip_reason:
            section = dict(name=name, status="skipped", reason=skip_reason)
        else:
            try:
                section = dict(name=name, status="ok", **fn())
                if any(not c.get("ok", True) for c in section.get("checks", [])):
                    section["status"] = "failed"
            except KeyboardInterrupt as err:
                interrupted = err
                section = dict(name=name, status="interrupted", error="KeyboardInterrupt (SIGINT) inside this section",
                               traceback=traceback.format_exc()[-4000:])
            except Exception as err:  # a broken section must not hide the others
                section = dict(name=name, status="failed", error=f"{type(err).__name__}: {err}",
                               traceback=traceback.format_exc()[-4000:])
        section["seconds"] = round(time.perf_counter() - start, 2)
        self.sections.append(section)
        self.write()
        print(f"[{section['status']:7s}] {name} ({section['seconds']} s)"
              + (f": {section.get('reason') or section.get('error')}" if section["status"] != "ok" else ""),
              flush=True)
        if interrupted is not None:
            raise interrupted

    def write(self) -> None:
        (self.out / "validate.json").write_text(json.dumps({"sections": self.sections}, indent=1, default=str))
        (self.out / "validate.md").write_text(markdown(self.sections))

    @property
    def failed(self) -> bool:
        return any(s["status"] in ("failed", "interrupted") for s in self.sections)


def markdown(sections: list[dict]) -> str:
    lines = ["# kernels.validate report", ""]
    for s in sections:
        lines += [f"## {s['name']}: {s['status']} ({s['seconds']} s)", ""]
        if s["status"] == "skipped":
            lines += [f"skipped: {s['reason']}", ""]
            continue
        if "error" in s:
            lines += ["```", s["error"], *s.get("traceback", "").splitlines()[-25:], "```", ""]
        for key, value in s.items():
            if key in ("name", "status", "seconds", "checks", "rows", "error", "traceback"):
                continue
            lines.append(f"- {key}: {value}")
        rows = s.get("checks") or s.get("rows")
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for r in rows:
                lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------- sections
def environment(device: torch.device) -> dict:
    import triton

    info = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                interpreter=_backend.triton_interpreter_enabled(), device=str(device))
    if device.type == "cuda":
        t = _backend.target(device)
        info.update(gpu=torch.cuda.get_device_name(device), arch=f"sm_{t.arch}", shared_bytes_per_block=t.shared_bytes,
                    float32_matmul_precision=torch.get_float32_matmul_precision())
    return info


def bandwidth(device: torch.device) -> dict:
    from .benchmark import measure_copy_bandwidth

    return dict(copy_bandwidth_gbps=round(measure_copy_bandwidth(device.type) / 1e9, 1))


def build_facts(device: torch.device) -> dict:
    """Run every kernel once at SparseFormer-T's shapes, then read what the JIT compiled."""
    from . import aot, fused, mixing, sampling

    for dtype in (torch.bfloat16, torch.float32):
        for ndim in (2, 3):
            cases = _cases(device, dtype, ndim, small=False)
            for case in cases:
                case["run"]()
    torch.cuda.synchronize(device)
    rows = []
    for module, name in [(sampling, "sparse_sample_fwd_kernel"), (sampling, "sparse_sample_bwd_kernel"),
                         (mixing, "adaptive_mix_fwd_kernel"), (mixing, "adaptive_mix_bwd_kernel"),
                         (fused, "sample_mix_fwd_kernel"), (fused, "sample_mix_bwd_kernel")]:
        fn = getattr(module, name)
        for cache in fn.device_caches.values():
            for kernel in cache[0].values():
                kernel._init_handles()
                row = dict(kernel=name, registers=kernel.n_regs, spill_bytes=kernel.n_spills,
                           shared_bytes=kernel.metadata.shared, num_warps=kernel.metadata.num_warps)
                with contextlib.suppress(Exception):  # cuobjdump is in the triton wheel; say so if not
                    row.update(aot.sass_atomics(kernel.asm["cubin"]))
                rows.append(row)
    return dict(rows=rows)


def _cases(device: torch.device, dtype: torch.dtype, ndim: int, small: bool) -> list[dict]:
    """One case per op: inputs, and closures that run it through autograd on the device."""
    from .fused import sample_and_mix
    from .mixing import adaptive_mix
    from .sampling import sparse_sample

    B, N, P, C, HW, T = (1, 3, 9, 20, 6, 3) if small else (4, 49, 36, 96, 56, 8)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    fmap = torch.randn((B, HW, HW, C) if ndim == 2 else (B, T, HW, HW, C), dtype=dtype)
    points = (torch.rand(B, N, P, ndim) * 1.4 - 0.2).to(pdt)
    params = torch.cat([torch.randn(B, N, C * C) / C**0.5, torch.randn(B, N, P * P) / P**0.5], -1).to(dtype)
    x, bc, bs = torch.randn(B, N, P, C).to(dtype), torch.randn(C).to(dtype), torch.randn(P).to(dtype)
    grad = torch.randn(B, N, P, C).to(dtype)
    cases = [dict(op="sparse_sample", inputs=[fmap, points], fn=lambda f, p: sparse_sample(f, p, backend="triton"))]
    if ndim == 2:
        cases.append(dict(op="adaptive_mix", inputs=[x, params, bc, bs],
                          fn=lambda *a: adaptive_mix(*a, backend="triton")))
    cases.append(dict(op="sample_and_mix", inputs=[fmap, points, params, bc, bs],
                      fn=lambda *a: sample_and_mix(*a, backend="triton")))
    for case in cases:
        case.update(grad=grad, ndim=ndim, dtype=dtype)
        case["run"] = _runner(case, device)
    return cases


def _runner(case: dict, device: torch.device):
    def run():
        leaves = [t.detach().to(device).requires_grad_(True) for t in case["inputs"]]
        out = case["fn"](*leaves)
        out.backward(case["grad"].to(device))
        return [out.detach()] + [t.grad for t in leaves]
    return run


def _reference(case: dict) -> list[torch.Tensor]:
    """Output and gradients of the float64 reference on the CPU (the explicit reference backwards:
    they define what non-finite points get)."""
    from .fused import sample_and_mix_reference, sample_and_mix_reference_backward
    from .mixing import adaptive_mix_reference, adaptive_mix_reference_backward
    from .sampling import sparse_sample_reference, sparse_sample_reference_backward

    inputs = [t.detach().double().cpu() for t in case["inputs"]]
    grad = case["grad"].double().cpu()
    fwd, bwd = {"sparse_sample": (sparse_sample_reference, sparse_sample_reference_backward),
                "adaptive_mix": (adaptive_mix_reference, adaptive_mix_reference_backward),
                "sample_and_mix": (sample_and_mix_reference, sample_and_mix_reference_backward)}[case["op"]]
    return [fwd(*inputs), *bwd(grad, *inputs)]


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """Norm-wise relative error of a against b (b's norm floored at `floor`)."""
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _compare(got, ref, dtype) -> tuple[float, bool]:
    """Worst norm-wise relative error over outputs and gradients; NaN must be where the reference has it."""
    worst, ok = 0.0, True
    for g, r in zip(got, ref, strict=True):
        g = g.detach().double().cpu()
        if not torch.equal(torch.isnan(g), torch.isnan(r)):
            return float("nan"), False
        g, r = g.nan_to_num(), r.nan_to_num()
        err = _rel(g, r, 1e-300)
        worst = max(worst, err)
    return worst, ok and worst <= TOL[dtype]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def correctness(device: torch.device, small: bool, dtypes: tuple[str, ...] = tuple(DTYPES)) -> dict:
    checks = []
    if small:  # the interpreter run keeps to the two dtypes the model trains in (each case costs ~1 s there)
        dtypes = tuple(d for d in dtypes if d in ("fp32", "bf16")) or ("fp32",)
    for dtype in (DTYPES[d] for d in dtypes):
        for ndim in (2, 3):
            for case in _cases(device, dtype, ndim, small):
                for variant in ("random", "nan_inf", "contention"):
                    pts = case["inputs"][1] if case["op"] != "adaptive_mix" else None
                    if pts is None and variant != "random":
                        continue
                    inputs = list(case["inputs"])
                    if variant == "nan_inf":
                        p = pts.clone()
                        p[0, 0, 0, 0], p[0, 1, 1, -1], p[0, 2, 2, 0] = float("nan"), float("inf"), -float("inf")
                        inputs[1] = p
                    elif variant == "contention":  # every point of every token inside one 2 x 2 cell
                        inputs[1] = torch.full_like(pts, 0.5) + torch.rand_like(pts) * 1e-3
                    c = {**case, "inputs": inputs}
                    err, ok = _compare(_runner(c, device)(), _reference(c), dtype)
                    checks.append(dict(op=case["op"], dims=f"{ndim}d", dtype=str(dtype).replace("torch.", ""),
                                       case=variant, rel_err=err, tol=TOL[dtype], ok=ok))
    return dict(checks=checks)


def determinism(device: torch.device, small: bool) -> dict:
    checks = []
    for case in _cases(device, torch.float32, 2, small):
        first, second = case["run"](), case["run"]()
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            what = "output" if i == 0 else f"grad {i - 1}"
            is_map = case["op"] != "adaptive_mix" and i == 1
            drift = _rel(a, b, 1e-30)
            checks.append(dict(op=case["op"], tensor="grad map" if is_map else what, bitwise=torch.equal(a, b),
                               rel_drift=drift, ok=torch.equal(a, b) or (is_map and drift < 1e-5)))
        try:
            torch.use_deterministic_algorithms(True)
            refused = False
            try:
                case["run"]()
            except RuntimeError as err:
                refused = "deterministic" in str(err)
            if case["op"] != "adaptive_mix":
                checks.append(dict(op=case["op"], tensor="use_deterministic_algorithms(True)", refused=refused,
                                   ok=refused))
        finally:
            torch.use_deterministic_algorithms(False)
    return dict(checks=checks)


BF16_MARGIN, BF16_SLACK = 2.0, 1e-2  # the model's bf16 check: Triton's error vs fp32 <= 2 x the reference's + 1e-2


def low_precision_verdict(precision: str, names: list[str], err_triton: list[float], err_torch: list[float]) -> dict:
    """One row: per tensor, Triton's relative error against fp32 must stay within BF16_MARGIN x the
    reference backend's (+ BF16_SLACK); the row names the tensor closest to (or over) its bound."""
    excess = [t - (BF16_MARGIN * r + BF16_SLACK) for t, r in zip(err_triton, err_torch, strict=True)]
    worst = max(range(len(excess)), key=excess.__getitem__)
    return dict(check=f"triton vs fp32 against torch vs fp32, {precision}", worst_tensor=names[worst],
                triton_rel_err=err_triton[worst], torch_rel_err=err_torch[worst],
                tol=f"<= {BF16_MARGIN} x torch + {BF16_SLACK}", max_rel_err_triton=max(err_triton),
                max_rel_err_torch=max(err_torch), ok=excess[worst] <= 0)


def model_check(device: torch.device, small: bool) -> dict:
    """SparseFormer with the Triton kernels against the same weights on the PyTorch references."""
    from model import create_model

    kw = (dict(num_tokens=4, num_points=9, conv_dim=8, focusing_dim=16, cortex_dim=32, cortex_depth=2, num_heads=4,
               num_classes=10) if small else {})
    res = 32 if small else 224
    batch = 2 if small else 8
    m = create_model("sparseformer_nano" if small else "sparseformer_t", drop_path_rate=0.0, **kw).to(device)
    x = torch.randn(batch, 3, res, res, device=device)
    names = ["logits"] + [n for n, _ in m.named_parameters()]
    checks, exact = [], None
    for name, dtype in [("fp32", None)] + ([] if small else [("bf16", torch.bfloat16)]):
        results = {}
        for backend in ("torch", "triton"):
            m.backend = backend
            m.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = m(x)
            logits.float().square().mean().backward()
            results[backend] = [logits.detach().float()] + [p.grad.float() for p in m.parameters()]
        if dtype is None:  # fp32: the two backends agree to fp32 rounding
            exact = results["torch"]
            errs = [_rel(a, b) for a, b in zip(results["triton"], exact, strict=True)]
            worst = max(range(len(errs)), key=errs.__getitem__)
            checks.append(dict(check="triton vs torch, fp32", worst_rel_err=errs[worst], worst_tensor=names[worst],
                               tol=1e-4, ok=errs[worst] <= 1e-4))
            continue
        # 16-bit: the RoI branch's gradients are only ~10-20% accurate in bf16 whichever backend computes
        # them (sampling points move by bf16-sized steps across pixel edges), so two correct bf16 runs
        # differ by as much; each backend is measured against the fp32 result and Triton must be no
        # worse than BF16_MARGIN x the reference's error (+ BF16_SLACK)
        err = {b: [_rel(g, e) for g, e in zip(results[b], exact, strict=True)] for b in ("triton", "torch")}
        checks.append(low_precision_verdict(name, names, err["triton"], err["torch"]))
    m.backend = "triton"
    if device.type == "cpu":  # tracing under the interpreter takes a minute; tests/test_kernels_ops.py covers it
        checks.append(dict(check="torch.compile, triton", skipped="on CPU (see tests/test_kernels_ops.py)", ok=True))
        return dict(checks=checks)
    # each of the two below that fails is one failed row, not the loss of the section's other checks
    try:
        checks.append(_compile_check(m, x, device))
    except Exception as e:  # noqa: BLE001 (reported in the row)
        checks.append(dict(check="torch.compile, triton", error=f"{type(e).__name__}: {e}", ok=False))
    if device.type == "cuda":
        try:
            checks.append(_cuda_graph_check(m, x))
        except Exception as e:  # noqa: BLE001
            checks.append(dict(check="CUDA graph capture + replay", error=f"{type(e).__name__}: {e}", ok=False))
    return dict(checks=checks)


def _compile_check(m, x, device) -> dict:
    """The Triton model under torch.compile (inductor on a GPU) against the same model eager."""
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=False, backend="aot_eager" if device.type == "cpu" else "inductor")
    m.zero_grad(set_to_none=True)
    ref = m(x)
    out = compiled(x)
    err = _rel(out, ref, 0.0)
    return dict(check="torch.compile, triton", worst_rel_err=err, tol=1e-4, ok=err <= 1e-4)


def _cuda_graph_check(m, x) -> dict:
    """Capture forward + backward of the Triton model in one CUDA graph and replay it."""
    m.backend = "triton"
    static_x = x.clone()
    opt_grads = [p for p in m.parameters()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up outside the capture (kernel compilation, allocator)
            m.zero_grad(set_to_none=False)
            m(static_x).square().mean().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    m.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_logits = m(static_x)
        static_logits.square().mean().backward()
    graph.replay()
    torch.cuda.synchronize()
    eager_logits = m(static_x).detach()
    err = _rel(static_logits, eager_logits, 0.0)
    finite = all(torch.isfinite(p.grad).all().item() for p in opt_grads if p.grad is not None)
    return dict(check="CUDA graph capture + replay", worst_rel_err=err, tol=1e-4, ok=err <= 1e-4 and finite)


def timings(device: torch.device) -> dict:
    from .benchmark import measure_copy_bandwidth, run_kernel_benchmarks

    bw = measure_copy_bandwidth(device.type)
    rows = run_kernel_benchmarks(device=device.type, dtypes=("fp32", "bf16"), batch_sizes=(8, 32, 128),
                                 variants=("sparseformer_t",), repeats=10, peak_bandwidth=bw)
    summary = []
    for (kernel, which), (what, bound) in TARGETS.items():
        for r in rows:
            if r["kernel"] == kernel and r["pass"] == which and r["impl"] == "triton" and r["batch"] == 128:
                value = r["pct_of_floor"] if what.startswith("%") else r["speedup_vs_reference"]
                summary.append(dict(kernel=kernel, pass_=which, dtype=r["dtype"], target=f">= {bound} {what}",
                                    value=value, met=value >= bound))
    return dict(copy_bandwidth_gbps=round(bw / 1e9, 1), rows=summary + [
        {k: r[k] for k in ("kernel", "pass", "dtype", "batch", "impl", "time_us", "floor_us", "pct_of_floor",
                           "speedup_vs_reference")} for r in rows])


def _step_stats(backend: str, device: torch.device) -> dict:
    """SparseFormer-T at B = 128, bf16 autocast, fused AdamW: median of 10 steps and peak memory (model,
    optimizer state and activations, above what was allocated before)."""
    from model import create_model

    torch.manual_seed(0)
    held_before = torch.cuda.memory_allocated(device)  # what earlier sections still hold: not this step's
    m = create_model("sparseformer_t", backend=backend).to(device).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    x = torch.randn(128, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (128,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    return dict(backend=backend, step_ms=1e3 * median, img_s=128 / median,
                max_memory_allocated_mib=(torch.cuda.max_memory_allocated(device) - held_before) / 2**20)


def training_step(device: torch.device) -> dict:
    """A SparseFormer-T training step per backend: time and peak memory, and the targets."""
    rows = []
    for backend in ("torch", "triton"):
        rows.append(_step_stats(backend, device))
        torch.cuda.empty_cache()
    speedup = rows[0]["step_ms"] / rows[1]["step_ms"]
    memory = rows[1]["max_memory_allocated_mib"] / rows[0]["max_memory_allocated_mib"]
    return dict(rows=rows, speedup_triton_vs_torch=speedup, memory_triton_over_torch=memory,
                target="step >= 1.5x the torch backend with <= 60% of its peak memory",
                met=speedup >= 1.5 and memory <= 0.6)


SECTIONS = ("environment", "bandwidth", "build", "correctness", "determinism", "model", "timings", "training_step")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/validate", help="folder for validate.json and validate.md")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset to run, in this order: {','.join(SECTIONS)}")
    parser.add_argument("--dtypes", default=",".join(DTYPES),
                        help="the correctness section's dtypes (fewer: fewer kernels to compile), e.g. fp32,bf16")
    args = parser.parse_args(argv)
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if not dtypes or set(dtypes) - set(DTYPES):
        parser.error(f"--dtypes {args.dtypes!r}: choose from {','.join(DTYPES)}")
    chosen = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        parser.error(f"--sections {args.sections!r}: unknown {unknown or 'empty'}; choose from {','.join(SECTIONS)}")
    out = Path(args.out)
    gpu = torch.cuda.is_available() and not _backend.triton_interpreter_enabled()
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu and not _backend.triton_interpreter_enabled():
        print("no CUDA device and TRITON_INTERPRET unset: nothing can run the kernels; "
              "set TRITON_INTERPRET=1 for the CPU subset", file=sys.stderr)
        return 2
    no_gpu = None if gpu else "no CUDA device (CPU interpreter run: tiny shapes only)"
    runs = {  # name -> (the section, why it is skipped here or None)
        "environment": (lambda: environment(device), None),
        "bandwidth": (lambda: bandwidth(device), no_gpu),
        "build": (lambda: build_facts(device), no_gpu),
        "correctness": (lambda: correctness(device, small=not gpu, dtypes=dtypes), None),
        "determinism": (lambda: determinism(device, small=not gpu), None),
        "model": (lambda: model_check(device, small=not gpu), None),
        "timings": (lambda: timings(device), no_gpu),
        "training_step": (lambda: training_step(device), no_gpu),
    }
    assert tuple(runs) == SECTIONS, "kernels.validate: SECTIONS (the CLI's names and order) and the sections run"
    torch.manual_seed(0)
    with contextlib.ExitStack() as stack:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")  # exact or 3xTF32 fp32 dots: the 1e-5 bound applies
        stack.callback(torch.set_float32_matmul_precision, before)
        report = Report(out)
        try:
            for name, (section, skip_reason) in runs.items():
                if name in chosen:
                    report.run(name, section, skip_reason)
        except KeyboardInterrupt:
            print(f"interrupted; the sections before it are in {out / 'validate.md'}", flush=True)
            return 130
    print(f"report: {out / 'validate.md'} and {out / 'validate.json'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
