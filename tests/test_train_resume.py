"""Resume: a run stopped (or killed) and continued with trainer.resume=auto reproduces the loss
curve of the uninterrupted run exactly on the CPU (model, EMA, optimizer, scaler, schedule,
sampler position and RNG state all come back from the checkpoint)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train as train_script
from train_helpers import FAST, REPO, TINY_MNIST, TINY_MODEL, compose_cfg

# 3 epochs of 4 steps, a checkpoint every 2 steps; W&B off (metrics.jsonl still written)
ARGS = [*TINY_MODEL, *TINY_MNIST, *FAST, "trainer.epochs=3", "trainer.ckpt_every_steps=2",
        "logger.num_roi_images=0", "logger.mode=disabled", "+model.drop_path_rate=0.1"]


def losses(run_dir) -> dict[int, float]:
    """step -> loss; a step logged twice (lost after the last checkpoint, redone) keeps the redo."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "train/loss" in m:
            out[m["step"]] = m["train/loss"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    top1 = train_script.train(compose_cfg([*ARGS, f"run_dir={run_dir}"]), run_dir)
    return losses(run_dir), top1


def test_stopped_mid_epoch_then_resumed(uninterrupted, tmp_path):
    ref, ref_top1 = uninterrupted
    assert sorted(ref) == list(range(1, 13))
    # max_steps=6 stops in the middle of epoch 1 (4 steps per epoch)
    train_script.train(compose_cfg([*ARGS, f"run_dir={tmp_path}", "trainer.max_steps=6"]), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 2)
    top1 = train_script.train(compose_cfg([*ARGS, f"run_dir={tmp_path}", "trainer.resume=auto"]), tmp_path)
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    assert [got[s] for s in range(1, 13)] == [ref[s] for s in range(1, 13)]
    assert top1 == ref_top1


def test_killed_run_resumes_from_its_last_checkpoint(uninterrupted, tmp_path):
    ref, ref_top1 = uninterrupted
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *ARGS, f"run_dir={tmp_path}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if any(json.loads(line).get("step", 0) >= 5 for line in lines):
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)  # no chance to save anything
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert saved >= 4 and saved % 2 == 0  # checkpoints every 2 steps and at every epoch end (4 steps)
    top1 = train_script.train(compose_cfg([*ARGS, f"run_dir={tmp_path}", "trainer.resume=auto"]), tmp_path)
    got = losses(tmp_path)
    assert [got[s] for s in range(1, 13)] == [ref[s] for s in range(1, 13)]  # the redone steps too
    assert top1 == ref_top1
