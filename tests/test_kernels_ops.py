"""Both kernels as torch.library ops: opcheck, FLOP counting, torch.compile tracing, benchmark smoke,
and an ahead-of-time sm_90 build."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kernels import adaptive_mix, sparse_sample
from kernels.benchmark import format_table, run_kernel_benchmarks
from kernels.mixing import _adaptive_mix_backward_op, _adaptive_mix_op
from kernels.sampling import _sparse_sample_backward_op, _sparse_sample_op


def _sample_args(dtype=torch.float32):
    return torch.randn(1, 4, 5, 8, dtype=dtype), torch.rand(1, 2, 3, 2, dtype=dtype)


def _mix_args(dtype=torch.float32):
    B, N, P, C = 1, 2, 3, 8
    return (torch.randn(B, N, P, C, dtype=dtype), torch.randn(B, N, C, C, dtype=dtype), torch.randn(C, dtype=dtype),
            torch.randn(B, N, P, P, dtype=dtype), torch.randn(P, dtype=dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of all four ops."""
    f, p = _sample_args(torch.float64)
    torch.library.opcheck(_sparse_sample_op, (f.requires_grad_(), p.requires_grad_(), 0.5, backend))
    torch.library.opcheck(_sparse_sample_backward_op, (torch.randn(1, 2, 3, 8, dtype=torch.float64),
                                                       f.detach(), p.detach(), None, backend))
    m = [t.requires_grad_() for t in _mix_args(torch.float64)]
    torch.library.opcheck(_adaptive_mix_op, (*m, backend))
    torch.library.opcheck(_adaptive_mix_backward_op, (torch.randn(1, 2, 3, 8, dtype=torch.float64),
                                                      *[t.detach() for t in m], backend))


def test_flop_counter_counts_both_ops():
    f, p = _sample_args()
    m = _mix_args()
    with FlopCounterMode(display=False) as counter:
        sparse_sample(f, p, backend="torch")
        adaptive_mix(*m, backend="torch")
    B, N, P, C = 1, 2, 3, 8
    assert counter.get_total_flops() == 2 * 4 * B * N * P * C + 2 * B * N * (P * C * C + P * P * C)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_traces_without_graph_breaks(backend):
    """fullgraph=True fails on any graph break. The aot_eager backend runs AOTAutograd (fake
    tensors through both ops, forward and backward graphs) without needing a C++ toolchain."""
    torch._dynamo.reset()

    def fn(features, points, mc, bc, ms, bs):
        x = sparse_sample(features, points, point_grad_clamp=1.0, backend=backend)
        return adaptive_mix(x, mc, bc, ms, bs, backend=backend).square().sum()

    f, p = _sample_args()
    _, mc, bc, ms, bs = _mix_args()
    inputs = [t.requires_grad_() for t in (f, p, mc, bc, ms, bs)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(fn(*inputs), inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    """The default inductor backend on CPU (~30 s: it builds C++ for the surrounding ops)."""
    torch._dynamo.reset()

    def fn(features, points, mc, bc, ms, bs):
        x = sparse_sample(features, points, backend="torch")
        return adaptive_mix(x, mc, bc, ms, bs, backend="torch").square().sum()

    f, p = _sample_args()
    inputs = [t.requires_grad_() for t in (f, p, *_mix_args()[1:])]
    grads = torch.autograd.grad(torch.compile(fn, fullgraph=True)(*inputs), inputs)
    for g, r in zip(grads, torch.autograd.grad(fn(*inputs), inputs)):
        torch.testing.assert_close(g, r)


def test_benchmark_smoke_cpu():
    rows = run_kernel_benchmarks(device="cpu", dtypes=("fp32",), batch_sizes=(1,), variants=("sparseformer_t",),
                                 repeats=2, passes=("fwd", "fwd+bwd"))
    assert {r["kernel"] for r in rows} == {"sparse_sample", "adaptive_mix"}
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert r["impl"] == "reference" and r["time_ms"] > 0 and r["floor_bytes"] > 0
        assert "reference only" in r["note"]
    table = format_table(rows)
    assert "sparse_sample" in table and "reference only" in table


@pytest.mark.slow
def test_kernels_build_for_sm90():
    """Every kernel compiles for the H100 (sm_90) through ptxas and fits its shared memory, checked
    without a GPU (~20 s); a subprocess because this session's kernels are bound to the interpreter."""
    code = "import json; from kernels.aot import build_all; print(json.dumps(build_all(90)))"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 16
    for r in rows:
        assert r["fits"] and r["registers"] > 0, r
