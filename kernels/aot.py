"""Ahead-of-time build of every kernel for a CUDA target, without a GPU.

    TRITON_INTERPRET=0 python -m kernels.aot            # sm_90 (H100), the paper shapes P = 36, C = 96

Runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas that ships in
the triton wheel) and reports registers, spilled bytes and shared memory per kernel and dtype.
This catches what the CPU interpreter cannot: dot operand minimums, shared-memory overflow,
register spills, lowering errors. It says nothing about speed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from . import mixing, sampling

SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # bytes of shared memory one block may use
TL = {"fp32": tl.float32, "fp64": tl.float64}


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spilled bytes) from `ptxas -v`, with the ptxas that Triton itself uses for `arch`."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # e.g. sm_90a
    ptxas = get_ptxas(arch).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        log = subprocess.run([ptxas, f"-arch={target}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
        if log.returncode:
            raise RuntimeError(f"ptxas failed on the generated PTX:\n{log.stderr}")
        log = log.stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def _build(fn, pointer_types: dict, constexprs: dict, options: dict, arch: int) -> dict:
    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "i32") for name in fn.arg_names
    }
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    regs, spills = _ptxas_stats(kernel.asm["ptx"], arch)
    return dict(kernel=fn.__name__, registers=regs, spill_bytes=spills, shared_bytes=kernel.metadata.shared,
                num_warps=options["num_warps"])


def build_all(arch: int = 90, P: int = 36, C: int = 96, dtypes=("bf16", "fp16", "fp32", "fp64")) -> list[dict]:
    """Compile the four kernels for `sm_{arch}` at (P, C) for each input dtype; one dict per kernel."""
    import torch

    rows = []
    for dt in dtypes:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                       "fp64": torch.float64}[dt]
        acc = "fp64" if dt == "fp64" else "fp32"  # compute dtype, gradient buffers and bias partials
        pt = acc  # points: fp32 (fp64 with fp64 maps)
        compute = TL[acc]
        block_q, block_c = sampling._sample_blocks(C)
        blocks = dict(COMPUTE=compute, BLOCK_Q=block_q, BLOCK_C=block_c)
        opts = dict(num_warps=4)
        rows.append(_build(sampling.sparse_sample_fwd_kernel,
                           {"p_f": f"*{dt}", "p_pt": f"*{pt}", "p_o": f"*{dt}"}, blocks, opts, arch))
        rows.append(_build(sampling.sparse_sample_bwd_kernel,
                           {"p_do": f"*{dt}", "p_f": f"*{dt}", "p_pt": f"*{pt}", "p_df": f"*{acc}",
                            "p_dpt": f"*{pt}", "clamp": "fp32"},
                           dict(HAS_CLAMP=True, **blocks), opts, arch))
        cfg = mixing._launch_config(torch.empty(1, 1, P, C, dtype=torch_dtype, device="meta"))
        opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        for fn in (mixing.adaptive_mix_fwd_kernel, mixing.adaptive_mix_bwd_kernel):
            ptrs = {name: f"*{dt}" for name in fn.arg_names if name.startswith("p_")}
            ptrs.update({name: f"*{acc}" for name in ("p_dbc", "p_dbs") if name in ptrs})  # bias partials
            rows.append(_build(fn, ptrs, cfg, opts, arch))
        for row in rows[-4:]:
            row.update(dtype=dt, arch=f"sm_{arch}", P=P, C=C,
                       fits=row["shared_bytes"] <= SHARED_LIMIT.get(arch, SHARED_LIMIT[80]))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--P", type=int, default=36)
    parser.add_argument("--C", type=int, default=96)
    args = parser.parse_args(argv)
    rows = build_all(args.arch, args.P, args.C)
    print(f"triton {triton.__version__}, sm_{args.arch}, P={args.P}, C={args.C}")
    for r in rows:
        print(f"{r['kernel']:26s} {r['dtype']:5s} warps={r['num_warps']} regs={r['registers']:3d} "
              f"spill={r['spill_bytes']:6d} B shared={r['shared_bytes']:6d} B fits={r['fits']}")
    return rows


if __name__ == "__main__":
    main()
