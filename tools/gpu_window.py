"""Everything a short GPU lease should check, in one command, most important first.

    python3 tools/gpu_window.py --out $OUT                # on the GPU machine: ~9 minutes at most
    python3 tools/gpu_window.py --out DIR --only validate,tests --budget 300
    python3 tools/gpu_window.py --plan                    # the steps, their caps and commands; runs nothing

Made for a lent machine whose python has torch and triton but not this repo's training stack: run
`make gpu-wheels` here first (it puts hydra-core, omegaconf, mlxtend and their missing
dependencies in .whl/, 1.7 MB) and carry `.whl`; this script installs them into a private folder
(`--site`) and puts it on the steps' PYTHONPATH. W&B is not needed (the training steps log with
logger.mode=disabled). docs/KERNELS.md, "A GPU window", says how to read what comes back.

Steps, in order (each has a time cap; a step that would start with less than its minimum left of the
budget is skipped, a step that runs past its cap is interrupted (SIGINT, as Ctrl-C) and then killed
with its whole process group):
  env             versions, the GPU, nvidia-smi
  validate        kernels.validate's build facts, bandwidth, correctness (fp32, bf16 at SparseFormer-T
                  shapes; fp16/fp64 are in the tests), determinism
  validate_model  kernels.validate's model section: SparseFormer-T triton vs torch in fp32 and bf16,
                  under torch.compile and CUDA-graph capture
  tests           the gpu-marked tests: the kernel tests on the device, device-side augmentation syncs
  train_bf16      python train.py (SparseFormer-nano, cluttered MNIST, backend=triton) in bf16, stopped
                  after 60 steps with a checkpoint
  resume_fp16     the same run resumed in fp16 (GradScaler) to the end of its 2 epochs (trainer.allow_config_change)
  train_video     python train.py data=moving_digits (VideoSparseFormer-nano, the 3-D kernels) for 1 epoch
  training_step   a SparseFormer-T training step at B = 128, triton vs torch: time and peak memory
  timings         the kernels against the floors and the eager chains, with what is left
Writes <out>/window.md (the table, updated after every step), <out>/window.log (every step's output)
and <out>/<step>.md for the four kernels.validate steps (its report, copied after the step; the JSON
stays under --work): six files, within the device tool's eight. The device call passes the commit
(GPU_WINDOW_COMMIT=<hash>: the copied tree has no .git). Exits 1 when a step failed or timed out.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Step:
    name: str
    cmd: list[str]
    cap_s: float                  # killed after this long
    min_s: float = 20.0           # not started with less than this left of the budget
    needs: tuple[str, ...] = ()   # modules that must import (else: skipped, naming them)
    after: str | None = None      # a step that must have passed first
    report: str | None = None     # a kernels.validate step: <work>/<report>/validate.md is copied to <out>/<report>.md
    result: dict = field(default_factory=dict)


def default_steps(work: Path) -> list[Step]:
    train = [PY, "train.py", "logger.mode=disabled", "+model.backend=triton", "hardware=auto"]
    gpu_tests = sorted(str(Path(p).relative_to(REPO)) for p in glob.glob(str(REPO / "tests" / "test_*.py"))
                       if Path(p).name.startswith("test_kernels_") or Path(p).stem.endswith("_gpu"))
    stack = ("hydra", "omegaconf", "mlxtend", "einops")
    # the kernel tests' time there is mostly Triton compiling ~100 specialisations, one CPU core each:
    # pytest-xdist (in the lent machine's image) spreads them over 8 processes
    parallel = ["-n", "8"] if importlib.util.find_spec("xdist") else []

    def validate(name: str, sections: str, cap_s: float, min_s: float, *extra: str) -> Step:
        """A kernels.validate step: its report, <work>/<name>/validate.md, comes back as <out>/<name>.md."""
        cmd = [PY, "-m", "kernels.validate", "--out", str(work / name), "--sections", sections, *extra]
        return Step(name, cmd, cap_s, min_s=min_s, report=name)

    return [
        Step("env", [PY, "-c", ENV_REPORT], 30, min_s=5),
        # fp16 and fp64 are left to the tests step (small shapes): ~20 fewer kernels to compile here
        validate("validate", "environment,bandwidth,build,correctness,determinism", 150, 60, "--dtypes", "fp32,bf16"),
        validate("validate_model", "environment,model", 150, 60),
        Step("tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *parallel, "-m", "gpu", *gpu_tests], 150,
             min_s=30),
        Step("train_bf16", [*train, "hardware.precision=bf16", f"run_dir={work / 'image'}", "trainer.epochs=2",
                            "trainer.max_steps=60"], 60, needs=stack),
        Step("resume_fp16", [*train, "hardware.precision=fp16", f"run_dir={work / 'image'}", "trainer.epochs=2",
                             "trainer.resume=auto", "trainer.allow_config_change=true"], 60, needs=stack,
             after="train_bf16"),
        Step("train_video", [*train, "data=moving_digits", "hardware.precision=bf16", f"run_dir={work / 'video'}",
                             "trainer.epochs=1"], 75, needs=stack),
        validate("training_step", "environment,training_step", 90, 40),
        validate("timings", "environment,timings", 240, 45),
    ]


ENV_REPORT = """
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    gib = p.total_memory / 2**30
    print(f"device {i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {gib:.0f} GiB")
import shutil, subprocess
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
"""


def append_log(path: Path, text: str) -> None:
    """window.log: every write appended and closed at once, so a killed window keeps what came before."""
    with open(path, "a") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def install_wheels(wheels: Path, site: Path, log) -> str:
    """pip-install the carried wheels (no index, no dependency resolution) into `site`."""
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        return f"no wheels in {wheels} (steps that need the training stack are skipped unless it is installed)"
    cmd = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode:
        return f"pip install of {len(files)} wheels failed (rc {proc.returncode}; window.log has pip's output)"
    return f"installed {len(files)} wheels into {site}: {', '.join(f.name.split('-')[0] for f in files)}"


def missing_modules(names: tuple[str, ...], env: dict) -> list[str]:
    if not names:
        return []
    code = ("import importlib.util, sys; "
            f"print(','.join(n for n in {list(names)!r} if importlib.util.find_spec(n) is None))")
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    return [n for n in proc.stdout.strip().split(",") if n] if proc.returncode == 0 else list(names)


def run_step(step: Step, cap_s: float, env: dict, log) -> dict:
    """Run one step in its own process group; at the cap interrupt, then kill, the group (`kill_group`).
    -> status, rc, seconds, the output's last line."""
    log(f"\n===== {step.name} (cap {cap_s:.0f} s) =====\n$ {' '.join(step.cmd)}\n")
    start = time.monotonic()
    proc = subprocess.Popen(step.cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=_default_sigint)
    try:
        out, _ = proc.communicate(timeout=cap_s)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        out = kill_group(proc)
        status = "timeout"
    seconds = time.monotonic() - start
    log(out or "")
    tail = [line for line in (out or "").strip().splitlines() if line.strip()][-1:]
    return dict(status=status, rc=proc.returncode, seconds=round(seconds, 1), last_line=(tail or [""])[0][:160])


def _default_sigint() -> None:
    """In the step's process, before exec: SIGINT back to its default. A command started in the
    background by a non-interactive shell (nohup ... &, a remote runner) inherits SIGINT ignored, and
    a python started so never turns it into KeyboardInterrupt: the interrupt below would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_group(proc: subprocess.Popen) -> str:
    """SIGINT to the step's process group first, as Ctrl-C would (pytest then prints its summary of
    what ran, train.py stops its ranks and says where), SIGKILL to whatever is left after 15 s: nothing
    of a killed step keeps the GPU or the output pipe. The pipe is read meanwhile (a summary longer
    than the pipe's buffer would otherwise block its writer until the kill). -> what the step printed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=15)[0] or ""
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[0] or ""


def window(steps: list[Step], out: Path, work: Path, budget_s: float, env: dict, header: list[str]) -> bool:
    """Run the steps in order inside the budget; window.md after each. -> all ran and passed."""
    out.mkdir(parents=True, exist_ok=True)
    log = functools.partial(append_log, out / "window.log")
    start = time.monotonic()
    for step in steps:
        left = budget_s - (time.monotonic() - start)
        before = {s.name: s.result.get("status") for s in steps}
        if step.after and before.get(step.after) != "ok":
            step.result = dict(status="skipped", reason=f"needs {step.after} to pass")
        elif left < step.min_s:
            step.result = dict(status="skipped", reason=f"{left:.0f} s of the budget left, needs {step.min_s:.0f}")
        elif missing := missing_modules(step.needs, env):
            step.result = dict(status="skipped", reason=f"not importable: {', '.join(missing)} (make gpu-wheels)")
        else:
            step.result = run_step(step, min(step.cap_s, left), env, log)
            if step.report and (work / step.report / "validate.md").is_file():
                shutil.copyfile(work / step.report / "validate.md", out / f"{step.report}.md")
        write_summary(out / "window.md", steps, header, time.monotonic() - start, budget_s)
        print(f"[{step.result['status']:7s}] {step.name} {step.result.get('seconds', '')}", flush=True)
    return all(s.result["status"] in ("ok", "skipped") for s in steps) and any(
        s.result["status"] == "ok" for s in steps)


def write_summary(path: Path, steps: list[Step], header: list[str], elapsed: float, budget: float) -> None:
    lines = ["# GPU window", "", *header, f"- elapsed {elapsed:.0f} s of a {budget:.0f} s budget", "",
             "| step | status | seconds | cap | last line / reason |", "|---|---|---|---|---|"]
    for s in steps:
        r = s.result
        if not r:
            lines.append(f"| {s.name} | not reached | | {s.cap_s:.0f} | |")
            continue
        what = r.get("reason") or r.get("last_line", "")
        lines.append(f"| {s.name} | {r['status']} | {r.get('seconds', '')} | {s.cap_s:.0f} | "
                     f"{what.replace('|', '/')} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/gpu_window")))
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    parser.add_argument("--only", default="", help="comma-separated step names (default: all)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl")
    parser.add_argument("--site", type=Path, default=Path("/tmp/sparseformer_site"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/sparseformer_window"),
                        help="run folders of the training steps (checkpoints stay here, not in --out)")
    parser.add_argument("--plan", action="store_true", help="print the steps and exit")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (rehearsal of the plumbing)")
    args = parser.parse_args(argv)
    steps = default_steps(args.work)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - {s.name for s in steps})
        if unknown:
            parser.error(f"--only: unknown step(s) {unknown}; the steps are {','.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in names]
    if args.plan:
        for s in steps:
            cmd = " ".join(a if "\n" not in a else "<script>" for a in s.cmd)
            print(f"{s.name:12s} cap {s.cap_s:4.0f} s  min {s.min_s:3.0f} s  {cmd}")
        print(f"caps sum to {sum(s.cap_s for s in steps):.0f} s; budget {args.budget:.0f} s")
        return 0
    if not args.allow_cpu and not shutil.which("nvidia-smi"):
        print("no nvidia-smi on this machine: run this on the GPU machine (--allow-cpu rehearses it here)",
              file=sys.stderr)
        return 2
    shutil.rmtree(args.work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "window.log").write_text("")
    wheels = install_wheels(args.wheels, args.site, functools.partial(append_log, args.out / "window.log"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(p for p in (str(args.site), str(REPO), os.environ.get("PYTHONPATH")) if p)}
    header = [f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {_commit()}",
              f"- wheels: {wheels}"]
    ok = window(steps, args.out, args.work, args.budget, env, header)
    print((args.out / "window.md").read_text())
    return 0 if ok else 1


def _commit() -> str:
    """$GPU_WINDOW_COMMIT (the device call passes it: the copied tree may have no .git, the machine no
    git), else git's, else unknown; never an error (it is only the report's header)."""
    if os.environ.get("GPU_WINDOW_COMMIT"):
        return os.environ["GPU_WINDOW_COMMIT"]
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        return "unknown (no git)"
    return proc.stdout.strip() or "unknown (no git)"


if __name__ == "__main__":
    sys.exit(main())
