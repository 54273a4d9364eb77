"""Process lifecycle: killing the `python train.py` the user started (which relaunches itself under
torchrun with hardware.processes=2) leaves no process of the run alive and nothing written afterwards;
a second run in a live run's folder refuses; stale temporary files go on start."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.train_helpers import FAST, REPO, TINY_MNIST, TINY_MODEL, compose_cfg, make_fake_imagenet, run_train
from training import lifecycle


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries `tag` (the launcher's children inherit it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"RELIAB_TAG={tag}".encode() in (d / "environ").read_bytes().split(b"\0"):
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(d.name))
        except OSError:
            continue
    return pids


def start_run(tmp_path: Path, tag: str, extra: list[str] = ()) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "RELIAB_TAG": tag}
    fast = [o for o in FAST if not o.startswith(("hardware.processes", "trainer.epochs"))]
    cmd = [sys.executable, str(REPO / "train.py"), *TINY_MODEL, *TINY_MNIST, *fast, "hardware.processes=2",
           "trainer.epochs=1000", "logger.num_roi_images=0", f"run_dir={run_dir}", *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, run_dir


def wait_for(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def snapshot(run_dir: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_launcher_leaves_no_process_and_no_writes(tmp_path, sig):
    tag = uuid.uuid4().hex
    proc, run_dir = start_run(tmp_path, tag)
    try:
        # the ranks are up and training once a checkpoint-free metric line is written
        wait_for(lambda: len(tagged_pids(tag)) >= 4 and (run_dir / "metrics.jsonl").is_file(), 240,
                 "the launcher, torchrun and 2 ranks to start training")
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
        wait_for(lambda: not tagged_pids(tag), 30, f"every process of the run to end after {sig.name}")
        before = snapshot(run_dir)
        time.sleep(2)
        assert snapshot(run_dir) == before, "files of the run changed after every process had ended"
        if sig == signal.SIGTERM:
            out = proc.stdout.read().decode()
            assert "interrupted at step" in out and "trainer.resume=auto" in out, out[-2000:]
            line = next(x for x in out.splitlines() if "interrupted at step" in x)
            assert "hardware.num_threads=1" in line and "hardware.processes=2" in line, line  # the user's overrides
    finally:
        for pid in tagged_pids(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_second_run_in_a_live_run_folder_refuses_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from training import lifecycle; "
                               f"lifecycle.lock_run_dir({str(tmp_path)!r}); print('locked', flush=True); "
                               "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=f"in use by process {holder.pid}"):
            lifecycle.lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lifecycle.lock_run_dir(tmp_path)  # free once the holder is gone (this test process now holds it)


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".last.pt.tmp.12345"
    stale.write_bytes(b"half a checkpoint")
    keep = tmp_path / "checkpoints" / "last.pt"
    keep.write_bytes(b"x")
    assert lifecycle.remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and keep.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_on_a_cpu_machine_is_one_line_before_any_process(tmp_path):
    res = run_train([*TINY_MODEL, *TINY_MNIST, "hardware=gpu", "hardware.processes=2"], cwd=tmp_path, timeout=120)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("config error: hardware.device=cuda but this machine has no usable CUDA device"), \
        res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "torch.distributed" not in res.stderr + res.stdout


def test_resume_auto_without_run_dir_is_an_error(tmp_path):
    res = run_train([*TINY_MODEL, *TINY_MNIST, *FAST, "trainer.resume=auto"], cwd=tmp_path, timeout=120)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("config error: trainer.resume=auto continues the run in "
                                                          "run_dir="), res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_empty_class_folder_is_reported(tmp_path, caplog):
    from data.imagenet import find_samples

    make_fake_imagenet(tmp_path, corrupt=False)
    (tmp_path / "train" / "n09999999").mkdir()
    with caplog.at_level("WARNING"):
        samples, classes = find_samples(tmp_path / "train")
    assert "n09999999" in classes and len(samples) == 8
    assert "1 class folder(s) under" in caplog.text and "n09999999" in caplog.text


def test_train_split_smaller_than_a_batch_is_one_line(tmp_path):
    import train as train_script

    root = make_fake_imagenet(tmp_path / "im", corrupt=False)
    cfg = compose_cfg(["data=imagenet", f"data.root={root}", "data.image_size=32", "data.batch_size=64",
                       "data.num_workers=0", "data.augment.repeats=1", *TINY_MODEL, *FAST, "logger.mode=disabled",
                       f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit, match="8 training images .* < batch size 64: lower data.batch_size"):
        train_script.train(cfg, tmp_path / "run")


@pytest.mark.parametrize("roi_images", [0, 2])  # with the RoI figure on, it used to crash picking its images
def test_all_undecodable_images_stop_the_run(tmp_path, roi_images):
    import train as train_script

    root = tmp_path / "im"
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                (root / split / c / f"{i}.JPEG").write_bytes(b"not a jpeg")
    cfg = compose_cfg(["data=imagenet", f"data.root={root}", "data.image_size=32", "data.batch_size=2",
                       "data.num_workers=0", "data.augment.repeats=1", *TINY_MODEL, *FAST, "logger.mode=disabled",
                       f"logger.num_roi_images={roi_images}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit, match=f"no decodable training file under {root}: all 6 files"):
        train_script.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "result.json").exists()


def test_an_error_inside_a_rank_is_one_line_and_in_train_log(tmp_path):
    """A truncated checkpoint to resume from, under the 2-process launcher: the user sees one line naming
    the file and the log, once (no rank tracebacks, no torchrun dump); train.log holds the traceback."""
    bad = tmp_path / "cut.pt"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 2000)
    run_dir = tmp_path / "run"
    fast = [o for o in FAST if not o.startswith("hardware.processes")]
    res = run_train([*TINY_MODEL, *TINY_MNIST, *fast, "hardware.processes=2", "logger.mode=disabled",
                     f"trainer.resume={bad}", f"run_dir={run_dir}"], cwd=tmp_path, timeout=240)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    failed = [line for line in out.splitlines() if "training failed" in line]
    assert len(failed) == 1 and f"{bad}: truncated or corrupt checkpoint" in failed[0], out[-3000:]
    assert f"{run_dir}/train.log" in failed[0]
    log_text = (run_dir / "train.log").read_text()
    assert "Traceback" in log_text and "truncated or corrupt checkpoint" in log_text
    assert not (run_dir / lifecycle.FAILED).exists()


def test_a_rank_failure_line_gives_the_reason_under_hydras_instantiation_error(tmp_path):
    """hydra.utils.instantiate wraps a constructor's error in InstantiationException, whose first line
    ("Error in call to target ...:") says nothing; the line names the cause."""
    from hydra.errors import InstantiationException

    reason = "SparseFormer: num_tokens must be a positive integer, got 0"
    try:
        try:
            raise ValueError(reason)
        except ValueError as e:
            raise InstantiationException("Error in call to target 'model.factory.create_model':\nValueError()") from e
    except InstantiationException as wrapped:
        lifecycle.record_rank_failure(tmp_path, wrapped, rank=1)
    assert lifecycle.take_rank_failure(tmp_path) == f"rank 1: ValueError: {reason}"


def test_the_ranks_are_outside_the_terminals_process_group(tmp_path):
    """Ctrl-C signals the terminal's foreground process group: only the launcher may be in it (it stops
    torchrun with one SIGTERM), not torchrun or the ranks, which would each print a traceback."""
    tag = uuid.uuid4().hex
    proc, run_dir = start_run(tmp_path, tag)
    try:
        wait_for(lambda: len(tagged_pids(tag)) >= 4, 90, "the launcher, torchrun and 2 ranks")
        launcher_group = os.getpgid(proc.pid)
        others = [p for p in tagged_pids(tag) if p != proc.pid]
        assert others and all(os.getpgid(p) != launcher_group for p in others)
        os.killpg(launcher_group, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, _ = proc.communicate(timeout=90)
        text = out.decode(errors="replace")
        assert "KeyboardInterrupt" not in text and "Traceback" not in text, text[-3000:]
        assert "interrupted at step" in text.strip().splitlines()[-1]
    finally:
        for pid in tagged_pids(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_is_ours_only_outside_torchrun_and_multi_task_slurm(monkeypatch):
    """A one-process run takes SIGTERM as Ctrl-C; a rank that torchrun or a Slurm job of several tasks
    started leaves signals to its launcher (train.under_a_launcher, also what launches_processes reads)."""
    import train as train_script

    for name in ("RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert not train_script.under_a_launcher()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not train_script.under_a_launcher()
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert train_script.under_a_launcher()
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("RANK", "0")
    assert train_script.under_a_launcher()
