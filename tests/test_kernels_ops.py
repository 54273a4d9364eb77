"""The kernels as torch.library ops: opcheck, FLOP counting, torch.compile tracing, the benchmark
smoke run, the ahead-of-time build for a GPU arch and the GPU validation command's CPU subset."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kernels import FeatureMap, adaptive_mix, sample_and_mix, sparse_sample
from kernels.benchmark import format_table, run_kernel_benchmarks
from kernels.fused import _sample_mix_backward_op, _sample_mix_op
from kernels.mixing import _adaptive_mix_backward_op, _adaptive_mix_op
from kernels.sampling import _sparse_sample_backward_op, _sparse_sample_op, chain_token, map_grad_root

REPO = Path(__file__).resolve().parents[1]
B, N, P, C = 1, 2, 3, 8


def _map(D=2, dtype=torch.float64):
    return torch.randn((B, 4, 5, C) if D == 2 else (B, 2, 4, 5, C), dtype=dtype)


def _mix_args(dtype=torch.float64):
    return (torch.randn(B, N, P, C, dtype=dtype), torch.randn(B, N, C * C + P * P, dtype=dtype) / C,
            torch.randn(C, dtype=dtype), torch.randn(P, dtype=dtype))


@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, D):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of every op."""
    f = _map(D).requires_grad_()
    p = torch.rand(B, N, P, D, dtype=torch.float64).requires_grad_()
    token = chain_token(f)
    torch.library.opcheck(map_grad_root, (f,))
    torch.library.opcheck(_sparse_sample_op, (f, p, token, [0.5] * D, backend))
    torch.library.opcheck(_sparse_sample_backward_op, (torch.randn(B, N, P, C, dtype=torch.float64), f.detach(),
                                                       p.detach(), torch.zeros(f.shape, dtype=torch.float64),
                                                       None, backend))
    _, params, bc, bs = [t.requires_grad_() for t in _mix_args()]
    torch.library.opcheck(_sample_mix_op, (f, p, token, params, bc, bs, [0.5] * D, backend))
    torch.library.opcheck(_sample_mix_backward_op, (torch.randn(B, N, P, C, dtype=torch.float64), f.detach(),
                                                    p.detach(), params.detach(), bc.detach(), bs.detach(),
                                                    torch.zeros(f.shape, dtype=torch.float64), None, backend))
    if D == 2:
        m = [t.requires_grad_() for t in _mix_args()]
        torch.library.opcheck(_adaptive_mix_op, (*m, backend))
        torch.library.opcheck(_adaptive_mix_backward_op, (torch.randn(B, N, P, C, dtype=torch.float64),
                                                          *[t.detach() for t in m], backend))


def test_flop_counter_counts_every_op():
    f, p = _map(2, torch.float32), torch.rand(B, N, P, 2)
    x, params, bc, bs = _mix_args(torch.float32)
    sampling, mixing = 2 * 4 * B * N * P * C, 2 * B * N * (P * C * C + P * P * C)
    with FlopCounterMode(display=False) as counter:
        sparse_sample(f, p, backend="torch")
        adaptive_mix(x, params, bc, bs, backend="torch")
    assert counter.get_total_flops() == sampling + mixing
    with FlopCounterMode(display=False) as counter:
        sample_and_mix(f, p, params, bc, bs, backend="torch")
        sparse_sample(_map(3, torch.float32), torch.rand(B, N, P, 3), backend="torch")
    assert counter.get_total_flops() == sampling + mixing + 2 * sampling  # trilinear: 8 corners


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_traces_without_graph_breaks(backend, fused):
    """fullgraph=True fails on any graph break. The aot_eager backend runs AOTAutograd (fake tensors
    through every op, the gradient chain's mutation included, forward and backward graphs)
    without needing a C++ toolchain."""
    torch._dynamo.reset()

    def fn(features, p1, p2, params, bc, bs):
        fmap = FeatureMap(features, point_grad_clamp=1.0, backend=backend)
        if fused:
            y = fmap.sample_and_mix(p1, params, bc, bs)
        else:
            y = adaptive_mix(fmap.sample(p1), params, bc, bs, backend=backend)
        return y.square().sum() + fmap.sample(p2).sum()

    x, params, bc, bs = _mix_args(torch.float32)
    inputs = [t.requires_grad_() for t in (_map(2, torch.float32), torch.rand(B, N, P, 2), torch.rand(B, N, P, 2),
                                           params, bc, bs)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*inputs), inputs)
    ref_grads = torch.autograd.grad(fn(*inputs), inputs)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    """The default inductor backend on CPU (~30 s: it builds C++ for the surrounding ops)."""
    torch._dynamo.reset()

    def fn(features, points, params, bc, bs):
        fmap = FeatureMap(features, backend="torch")
        return fmap.sample_and_mix(points, params, bc, bs).square().sum() + fmap.sample(points).sum()

    _, params, bc, bs = _mix_args(torch.float32)
    inputs = [t.requires_grad_() for t in (_map(2, torch.float32), torch.rand(B, N, P, 2), params, bc, bs)]
    grads = torch.autograd.grad(torch.compile(fn, fullgraph=True)(*inputs), inputs)
    for g, r in zip(grads, torch.autograd.grad(fn(*inputs), inputs), strict=True):
        torch.testing.assert_close(g, r)


def test_benchmark_smoke_cpu():
    rows = run_kernel_benchmarks(device="cpu", dtypes=("fp32",), batch_sizes=(1,), variants=("sparseformer_t",),
                                 repeats=2, passes=("fwd", "fwd+bwd"))
    assert {r["kernel"] for r in rows} == {"sparse_sample", "adaptive_mix", "sample_and_mix"}
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["impl"] == "reference" and r["time_ms"] > 0 and r["floor_bytes"] > 0
        assert r["pct_of_floor"] is None and "reference only" in r["note"]  # no GPU bandwidth to compare with
    table = format_table(rows)
    assert "sparse_sample" in table and "reference only" in table


def test_no_kernel_launch_passes_a_python_float():
    """Every kernel launch of `kernels.aot`'s calls (each kernel, fp32 and fp64, 2-D and 3-D, clamps
    on) passes no Python float: compiled, it would be typed fp32 (a float64 clamp of 0.05 then clamps
    at 0.0500000007); the launches are recorded, not run."""
    from kernels import aot

    launches = []

    class Record:
        def __init__(self, fn):
            self.name = fn.__name__

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, args))

    with aot.kernels_replaced(Record):
        for dtype in (torch.float32, torch.float64):
            for ndim in (2, 3):
                for call in aot._calls(dtype, ndim):
                    call()
    assert {name for name, _ in launches} == set(aot.KERNELS)
    for name, args in launches:
        aot.check_launch_args(name, args)
    with pytest.raises(TypeError, match="rounded to fp32"):
        aot.check_launch_args("k", (1, 0.05))


@pytest.mark.slow
def test_aot_build_for_one_arch(tmp_path):
    """`python -m kernels.aot` compiles the kernels for sm_86 (the tightest shared memory: 99 KB) with
    the JIT's own specialization, without a GPU; every kernel fits, no 16-bit kernel spills, and
    the map gradient's atomics are fire-and-forget RED with no GPU-wide fences."""
    out = tmp_path / "aot.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--arch", "86", "--dtypes", "bf16",
                           "--json", str(out), "--markdown", str(tmp_path / "aot.md")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} >= {"sparse_sample_bwd_kernel", "adaptive_mix_bwd_kernel",
                                          "sample_mix_fwd_kernel", "sample_mix_bwd_kernel"}
    for r in rows:
        assert r["ok"] and r["registers"] > 0 and r["spill_bytes"] == 0, r
        assert r["atomg"] == 0 and r["membar_gpu"] == 0, r
    assert all(r["red"] > 0 for r in rows if r["kernel"] in ("sparse_sample_bwd_kernel", "sample_mix_bwd_kernel"))
    table = (tmp_path / "aot.md").read_text().splitlines()
    assert table[0].startswith("bf16:") and table[2] == "| kernel | sm_86 |"
    r = rows[0]
    assert (f"| `{r['kernel']}` {r['variant']} | {r['registers']} / {r['spill_bytes']} / "
            f"{r['shared_bytes'] / 1024:.1f} of 99 / {r['red']} |") in table
    assert len(table) == 4 + len(rows)  # title, blank, header, rule, a row per kernel


# What a GPU machine's own python (no venv, no internet) may lack: kernels.validate and the kernel
# tests must run without them (docs/KERNELS.md, "Validating on a GPU").
TRAINING_STACK = ("hydra", "omegaconf", "wandb", "av", "einops", "matplotlib", "PIL", "mlxtend")
_WITHOUT_TRAINING_STACK = f"import sys; sys.modules.update(dict.fromkeys({TRAINING_STACK!r}))"


def test_validate_runs_its_cpu_subset(tmp_path):
    """`python -m kernels.validate` without a GPU: the interpreter-feasible sections, a report after
    each, and the list of what it skipped; with none of the training stack importable."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run_validate = (f"{_WITHOUT_TRAINING_STACK}; import runpy; sys.argv = ['kernels.validate', '--out', "
                    f"{str(tmp_path)!r}]; runpy.run_module('kernels.validate', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", run_validate], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "validate.json").read_text())
    md = (tmp_path / "validate.md").read_text()
    sections = {s["name"]: s for s in report["sections"]}
    assert sections["correctness"]["status"] == "ok" and sections["determinism"]["status"] == "ok"
    assert sections["model"]["status"] == "ok"
    assert all(sections[name]["status"] == "skipped" for name in ("bandwidth", "timings", "training_step"))
    assert "skipped" in md and "no CUDA device" in md
    assert all(c["ok"] for c in sections["correctness"]["checks"])


def test_validate_runs_a_chosen_subset(tmp_path, capsys):
    """--sections runs only the named sections (in validate's order); an unknown name is a usage
    error that lists the valid ones."""
    from kernels import validate

    assert validate.main(["--out", str(tmp_path), "--sections", "determinism,environment"]) == 0
    report = json.loads((tmp_path / "validate.json").read_text())
    assert [s["name"] for s in report["sections"]] == ["environment", "determinism"]
    with pytest.raises(SystemExit) as err:
        validate.main(["--out", str(tmp_path), "--sections", "environment,timing"])
    assert err.value.code == 2
    assert "unknown ['timing']" in capsys.readouterr().err and "training_step" in validate.SECTIONS


def test_validate_dtypes_subset_and_an_interrupted_section_is_reported(tmp_path, capsys):
    """--dtypes narrows the correctness section (fewer kernels to build inside a short GPU lease);
    a SIGINT (a time cap) inside a section leaves that section in the report as `interrupted`, with
    where it was, and stops the run."""
    from kernels import validate

    assert validate.main(["--out", str(tmp_path), "--sections", "correctness", "--dtypes", "fp32"]) == 0
    report = json.loads((tmp_path / "validate.json").read_text())
    assert {c["dtype"] for c in report["sections"][0]["checks"]} == {"float32"}
    with pytest.raises(SystemExit) as err:
        validate.main(["--out", str(tmp_path), "--dtypes", "fp32,int8"])
    assert err.value.code == 2 and "--dtypes" in capsys.readouterr().err

    def cut_off():
        raise KeyboardInterrupt

    r = validate.Report(tmp_path / "r")
    r.run("first", lambda: dict(checks=[dict(ok=True)]))
    with pytest.raises(KeyboardInterrupt):
        r.run("second", cut_off)
    sections = json.loads((tmp_path / "r" / "validate.json").read_text())["sections"]
    assert [(s["name"], s["status"]) for s in sections] == [("first", "ok"), ("second", "interrupted")]
    assert r.failed and "cut_off" in (tmp_path / "r" / "validate.md").read_text()  # where it was


def test_the_bf16_model_check_allows_bf16_noise_not_a_broken_kernel():
    """bf16 gradients of the RoI branch are ~10-20% off fp32 whichever backend computes them: Triton
    passes at the reference's error level, fails well above it."""
    from kernels.validate import low_precision_verdict

    names = ["logits", "roi_adjust.weight", "head.weight"]
    torch_err = [4e-3, 0.18, 7e-3]
    assert low_precision_verdict("bf16", names, [4e-3, 0.14, 6e-3], torch_err)["ok"]  # within bf16 noise
    broken = low_precision_verdict("bf16", names, [4e-3, 0.15, 0.9], torch_err)  # one gradient wrong
    assert not broken["ok"] and broken["worst_tensor"] == "head.weight"
    assert not low_precision_verdict("bf16", names, [4e-3, 0.45, 6e-3], torch_err)["ok"]


@pytest.mark.parametrize("hypothesis", [True, False], ids=["with_hypothesis", "without_hypothesis"])
def test_kernel_tests_import_without_the_training_stack(hypothesis):
    """The gpu-marked kernel tests (`pytest -m gpu tests/test_kernels_*.py` on a GPU machine's own
    python) import with none of the training stack importable, and without hypothesis too (only the
    property tests then skip): pytest, torch, triton and numpy suffice."""
    modules = sorted(p.stem for p in (REPO / "tests").glob("test_kernels_*.py"))
    blocked = TRAINING_STACK if hypothesis else TRAINING_STACK + ("hypothesis", "hypothesis.strategies")
    block = f"import sys; sys.modules.update(dict.fromkeys({blocked!r}))"
    code = f"{block}; import conftest; " + "; ".join(f"import {m}" for m in modules)
    if not hypothesis:
        code += "; import test_kernels_sampling as t; assert t.test_random_shapes.pytestmark[0].name == 'skip'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=REPO / "tests", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(modules) >= 4


def test_interpreter_index_mend(monkeypatch):
    """kernels/backend.py mends triton 3.6's interpreter (its scalar `__index__` is `int()` of a
    1-element array, which numpy >= 2.4 refuses) and leaves a triton that squeezes first alone."""
    import operator
    from types import SimpleNamespace

    import numpy as np
    from triton.runtime import interpreter

    from kernels import backend

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    def patch_lang_tensor_36(tensor, scope):  # the line of triton 3.6
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    def patch_lang_tensor_39(tensor, scope):  # the line of triton 3.9
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    class Scalar:
        handle = SimpleNamespace(data=np.array([7], dtype=np.int32))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_lang_tensor_39)
    assert not backend._mend_interpreter_index()
    assert interpreter._patch_lang_tensor is patch_lang_tensor_39
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_lang_tensor_36)
    assert backend._mend_interpreter_index()
    interpreter._patch_lang_tensor(Scalar, Scope())
    assert operator.index(Scalar()) == 7 and list(range(0, Scalar(), 3)) == [0, 3, 6]


def test_launch_takes_the_first_config_that_fits_the_targets_shared_memory():
    """`backend.launch` builds the configs in turn on a GPU target and launches the first whose shared
    memory fits (once per kernel, target and dtypes); under the interpreter it runs the first; when
    none fits it says what each needed. The compiled figures come from the real compiler on a GPU (and
    in `kernels.aot`); here a stand-in kernel reports them."""
    from types import SimpleNamespace

    from kernels import backend as kb

    class Kernel:
        __name__ = "fake_kernel"

        def __init__(self, shared):
            self.shared, self.built, self.launched = shared, [], []

        def warmup(self, *args, grid, **config):
            self.built.append(config["BLOCK"])
            return SimpleNamespace(metadata=SimpleNamespace(shared=self.shared[config["BLOCK"]]))

        def __getitem__(self, grid):
            return lambda *args, **config: self.launched.append(config["BLOCK"])

    configs = [{"BLOCK": 64}, {"BLOCK": 32}, {"BLOCK": 16}]
    args = (torch.zeros(1, dtype=torch.float32), 3)
    k = Kernel({64: 200_000, 32: 120_000, 16: 40_000})
    kb.launch(k, (1,), args, configs, torch.device("cpu"))  # the interpreter: no limit, nothing built
    assert k.built == [] and k.launched == [64]
    kb._FITTING.clear()
    with kb.use_target(kb.target_for_arch(80)):  # 163 KB
        kb.launch(k, (1,), args, configs, torch.device("cpu"))
        kb.launch(k, (1,), args, configs, torch.device("cpu"))
    assert k.built == [64, 32] and k.launched == [64, 32, 32]  # the choice is kept: built once
    with kb.use_target(kb.target_for_arch(86)), pytest.raises(RuntimeError, match=r"fits sm_86's 101376 B .* "
                                                                                  r"need 200000, 120000 B"):
        kb.launch(Kernel({64: 200_000, 32: 120_000}), (1,), args, configs[:2], torch.device("cpu"))
    kb._FITTING.clear()


def test_mix_configs_end_with_ieee_dots_and_lower_nothing():
    """The mixing kernels' fallback configs free shared memory by smaller blocks, no pipelining and, for
    fp32, IEEE dots instead of 3xTF32; none is less accurate than the first, none repeats."""
    from kernels import backend as kb
    from kernels.mixing import mix_configs

    for dtype in (torch.float32, torch.bfloat16):
        configs = mix_configs(81, 16, dtype, kb.target_for_arch(80), backward=True)
        assert configs[-1]["DOT_PRECISION"] == "ieee" and configs[-1]["num_stages"] == 1
        assert all(c["DOT_PRECISION"] in ("ieee", configs[0]["DOT_PRECISION"]) for c in configs)
        assert len({repr(c) for c in configs}) == len(configs)
