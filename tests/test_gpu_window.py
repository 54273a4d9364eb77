"""tools/gpu_window.py, the one command of a short GPU lease: its runner on the CPU (order, caps,
process-group kills, skips, the summary) and its default plan (every command it would run exists
and composes)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import REPO, compose_cfg

spec = importlib.util.spec_from_file_location("gpu_window", REPO / "tools" / "gpu_window.py")
gpu_window = importlib.util.module_from_spec(spec)
sys.modules["gpu_window"] = gpu_window  # its dataclass looks its module up
spec.loader.exec_module(gpu_window)
Step = gpu_window.Step


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan can wait a moment for its reaper)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


def test_runner_order_caps_kills_and_skips(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    spawn = ("import subprocess, sys, time; "
             "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
             f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('spawned', flush=True); time.sleep(300)")
    steps = [
        Step("first", py("print('hello from first')"), 20, min_s=0),
        Step("broken", py("import sys; print('about to fail'); sys.exit(3)"), 20, min_s=0),
        Step("needs_broken", py("print('never')"), 20, min_s=0, after="broken"),
        Step("overrun", py(spawn), 5, min_s=0),  # caps leave the children time to start on a loaded machine
        Step("interrupted", py("import time\ntry:\n    time.sleep(300)\nexcept KeyboardInterrupt:\n"
                               "    print('summary on interrupt')"), 5, min_s=0),
        Step("no_module", py("print('never')"), 20, min_s=0, needs=("no_such_module_for_gpu_window",)),
        Step("too_late", py("print('never')"), 20, min_s=1e6),
    ]
    start = time.monotonic()
    ok = gpu_window.window(steps, tmp_path, tmp_path, budget_s=100, env=dict(os.environ), header=["- rehearsal"])
    assert not ok and time.monotonic() - start < 150  # not the 300 s sleeps: the caps stopped them
    status = {s.name: s.result["status"] for s in steps}
    assert status == {"first": "ok", "broken": "failed", "needs_broken": "skipped", "overrun": "timeout",
                      "interrupted": "timeout", "no_module": "skipped", "too_late": "skipped"}
    assert steps[4].result["last_line"] == "summary on interrupt"  # SIGINT first: a step can report
    assert steps[1].result["rc"] == 3 and steps[1].result["last_line"] == "about to fail"
    assert "no_such_module_for_gpu_window" in steps[5].result["reason"]
    assert "needs 1000000" in steps[6].result["reason"]
    assert not running(int(pid_file.read_text())), "the kill must reach the step's whole process group"
    md = (tmp_path / "window.md").read_text()
    assert "| overrun | timeout |" in md and "| first | ok |" in md and "- rehearsal" in md
    log = (tmp_path / "window.log").read_text()
    assert "hello from first" in log and "spawned" in log and "never" not in log.replace("print('never')", "")


def test_budget_caps_a_step_and_an_empty_run_is_not_a_pass(tmp_path):
    steps = [Step("slow", py("import time; time.sleep(300)"), cap_s=600, min_s=0)]
    start = time.monotonic()
    assert not gpu_window.window(steps, tmp_path, tmp_path, budget_s=1.5, env=dict(os.environ), header=[])
    assert steps[0].result["status"] == "timeout" and time.monotonic() - start < 100  # the budget stopped it
    skipped = [Step("late", py("print(1)"), 10, min_s=5)]
    assert not gpu_window.window(skipped, tmp_path, tmp_path, budget_s=1, env=dict(os.environ), header=[])


def test_default_plan_runs_what_exists(tmp_path):
    """Every step of the default plan names files, modules, validate sections and train.py overrides
    that exist and compose; the gpu tests include the kernel tests and the augmentation sync test."""
    from kernels import validate

    steps = {s.name: s for s in gpu_window.default_steps(tmp_path / "work")}
    assert list(steps) == ["env", "validate", "validate_model", "tests", "train_bf16", "resume_fp16", "train_video",
                           "training_step", "timings"]
    reports = [s for s in steps.values() if s.report]
    assert [s.name for s in reports] == ["validate", "validate_model", "training_step", "timings"]
    covered = set()
    for step in reports:  # each parses as validate's own CLI would
        cmd = step.cmd
        assert cmd[1:3] == ["-m", "kernels.validate"]
        assert cmd[cmd.index("--out") + 1] == str(tmp_path / "work" / step.report)
        sections = cmd[cmd.index("--sections") + 1].split(",")
        assert set(sections) <= set(validate.SECTIONS) and sections[0] == "environment"
        covered |= set(sections)
    assert covered == set(validate.SECTIONS), f"validate sections no step runs: {set(validate.SECTIONS) - covered}"
    assert len(reports) + 2 <= 8  # window.md, window.log and the reports: the device tool returns 8 files
    tests = [a for a in steps["tests"].cmd if a.startswith("tests/")]
    assert all((REPO / t).is_file() for t in tests)
    assert {"tests/test_kernels_sampling.py", "tests/test_data_augment_gpu.py"} <= set(tests)
    for name in ("train_bf16", "resume_fp16", "train_video"):
        cmd = steps[name].cmd
        assert cmd[1] == "train.py"
        cfg = compose_cfg(cmd[2:])
        assert cfg.logger.mode == "disabled" and cfg.model.backend == "triton"
    assert steps["resume_fp16"].after == "train_bf16"
    assert compose_cfg(steps["resume_fp16"].cmd[2:]).hardware.precision == "fp16"


def test_a_step_that_prints_a_long_summary_when_interrupted_keeps_it(tmp_path):
    """At the cap the step gets SIGINT and its output is read while it winds down: a summary longer
    than the pipe's buffer (pytest's failures) would otherwise block it until the SIGKILL and be lost."""
    summary = ("import sys, time\ntry:\n    time.sleep(300)\nexcept KeyboardInterrupt:\n"
               "    sys.stdout.write('x' * 200_000 + '\\nend of summary\\n')")
    step = Step("long_summary", py(summary), 3, min_s=0)
    start = time.monotonic()
    gpu_window.window([step], tmp_path, tmp_path, budget_s=100, env=dict(os.environ), header=[])
    assert step.result["last_line"] == "end of summary" and step.result["rc"] == 0
    assert time.monotonic() - start < 14  # not the 15 s wait for the kill


def test_a_validate_steps_report_is_copied_and_the_commit_needs_no_git(tmp_path, monkeypatch):
    write = ("import pathlib; p = pathlib.Path(%r) / 'rep'; p.mkdir(parents=True); "
             "(p / 'validate.md').write_text('# report')")
    step = Step("rep", py(write % str(tmp_path / "work")), 20, min_s=0, report="rep")
    (tmp_path / "out").mkdir()
    assert gpu_window.window([step], tmp_path / "out", tmp_path / "work", budget_s=60, env=dict(os.environ),
                             header=[])
    assert (tmp_path / "out" / "rep.md").read_text() == "# report"
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the machine
    monkeypatch.delenv("GPU_WINDOW_COMMIT", raising=False)
    assert gpu_window._commit() == "unknown (no git)"
    monkeypatch.setenv("GPU_WINDOW_COMMIT", "abc1234")
    assert gpu_window._commit() == "abc1234"


def test_main_plans_refuses_without_a_gpu_and_checks_names(tmp_path, monkeypatch, capsys):
    assert gpu_window.main(["--plan", "--out", str(tmp_path)]) == 0
    assert "caps sum to" in capsys.readouterr().out
    monkeypatch.setattr(gpu_window.shutil, "which", lambda name: None)
    assert gpu_window.main(["--out", str(tmp_path)]) == 2
    assert "run this on the GPU machine" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_window.main(["--only", "validate,tset", "--plan"])
    assert "unknown step(s) ['tset']" in capsys.readouterr().err


def test_tests_step_collects_on_a_python_without_the_training_stack(tmp_path):
    """The plan's test files collect when hydra, omegaconf, wandb, ... do not import (no wheels
    carried): the kernel tests run and the augmentation test skips, instead of a collection error
    that would cost the whole step."""
    from test_kernels_ops import TRAINING_STACK

    (tmp_path / "sitecustomize.py").write_text(  # not installed, as there: an import raises ModuleNotFoundError
        "import sys\n"
        "class Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {TRAINING_STACK!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Blocked())\n")
    step = next(s for s in gpu_window.default_steps(tmp_path) if s.name == "tests")
    tests = [a for a in step.cmd if a.startswith("tests/")]
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           "-p", "no:hydra_pytest", *tests]  # hydra's pytest plugin: installed here, not there
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_kernels_sampling.py::" in proc.stdout and "ERROR" not in proc.stdout
    assert "test_data_augment_gpu.py::" not in proc.stdout  # skipped at import: omegaconf is blocked
