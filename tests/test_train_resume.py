"""Resume: a run stopped (or killed) and continued with trainer.resume=auto reproduces the loss
curve of the uninterrupted run exactly on the CPU (model, EMA, optimizer, scaler, schedule,
sampler position and RNG state all come back from the checkpoint)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import train as train_script
from train_helpers import FAST, REPO, TINY_MNIST, TINY_MODEL, compose_cfg

# 3 epochs of 4 steps, a checkpoint every 2 steps, a log line every 5 and before every checkpoint (so a
# resumed run's loss windows are the uninterrupted run's); W&B off (metrics.jsonl still written)
ARGS = [*TINY_MODEL, *TINY_MNIST, *FAST, "trainer.epochs=3", "trainer.ckpt_every_steps=2", "logger.log_every_steps=5",
        "logger.num_roi_images=0", "logger.mode=disabled", "+model.drop_path_rate=0.1"]
LOGGED = [2, 4, 5, 6, 8, 10, 12]  # each window's mean loss: steps 1-2, 3-4, 5, 6, 7-8, 9-10, 11-12


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
    assert sorted(ref) == LOGGED
    # max_steps=6 stops in the middle of epoch 1 (4 steps per epoch)
    train_script.train(compose_cfg([*ARGS, f"run_dir={tmp_path}", "trainer.max_steps=6"]), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (6, 1, 2)
    top1 = train_script.train(compose_cfg([*ARGS, f"run_dir={tmp_path}", "trainer.resume=auto"]), tmp_path)
    got = losses(tmp_path)
    assert sorted(got) == LOGGED
    assert [got[s] for s in LOGGED] == [ref[s] for s in LOGGED]
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
    assert [got[s] for s in LOGGED] == [ref[s] for s in LOGGED]  # the redone steps too
    assert top1 == ref_top1


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A run stopped after 2 of its 12 steps (its checkpoint: last.pt at step 2)."""
    run_dir = tmp_path_factory.mktemp("two_steps")
    train_script.train(compose_cfg([*ARGS, f"run_dir={run_dir}", "trainer.max_steps=2"]), run_dir)
    return run_dir


def copy_run(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def test_resume_with_another_setting_stops_naming_it(two_steps, tmp_path):
    """A resume continues the run it resumes: a changed seed or lr stops with the list of changes;
    trainer.allow_config_change=true goes on; how far the run goes may change freely."""
    from training.config import ConfigError

    run_dir = copy_run(two_steps, tmp_path / "run")
    resume = [*ARGS, f"run_dir={run_dir}", "trainer.resume=auto", "trainer.max_steps=3"]
    with pytest.raises(ConfigError, match=r"seed: 0 -> 1; optim\.lr: .* -> 0\.5|optim\.lr: .* -> 0\.5; seed: 0 -> 1"):
        train_script.train(compose_cfg([*resume, "seed=1", "optim.lr=0.5"]), run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 2  # nothing written
    train_script.train(compose_cfg([*resume, "seed=1", "trainer.allow_config_change=true"]), run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


def test_resume_as_another_model_or_world_size_lists_it_before_loading(two_steps, tmp_path):
    """Another model's weights would not load: the list of changes comes first. A checkpoint written by
    2 ranks resumed by 1 is a change too (the per-rank data shards and RNG streams differ)."""
    from training.config import ConfigError

    run_dir = copy_run(two_steps, tmp_path / "run")
    resume = [*ARGS, f"run_dir={run_dir}", "trainer.resume=auto"]
    with pytest.raises(ConfigError, match=r"model\.num_tokens: 4 -> 9"):
        train_script.train(compose_cfg([a for a in resume if not a.startswith("+model.num_tokens")]
                                       + ["+model.num_tokens=9"]), run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    torch.save({**state, "rng": state["rng"] * 2}, last)
    with pytest.raises(ConfigError, match=r"ranks \(world size\): 2 -> 1"):
        train_script.train(compose_cfg(resume), run_dir)


def test_optimizer_settings_come_from_the_config_its_moments_from_the_file(tmp_path):
    """trainer.allow_config_change with another weight decay: the resumed AdamW uses the new value
    (load_state_dict alone would bring back the file's) and keeps the file's moments."""
    from training.checkpoint import TrainState
    from training.dist import DistInfo

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    TrainState(model=net, ema=None, optimizer=opt, scaler=None, schedule={}).save(tmp_path / "last.pt", DistInfo())
    opt2 = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.8, 0.99))
    TrainState(model=net, ema=None, optimizer=opt2, scaler=None, schedule={}).restore(tmp_path / "last.pt")
    group = opt2.param_groups[0]
    assert group["weight_decay"] == 0.1 and group["betas"] == (0.8, 0.99)
    torch.testing.assert_close(opt2.state[net.weight]["exp_avg"], opt.state[net.weight]["exp_avg"])


def test_cpu_seconds_carry_over_a_resume(two_steps, tmp_path):
    """The checkpoint counts the run's CPU seconds (with or without a budget); a resumed run whose
    budget those seconds already spend takes no step (the budget is the whole run's, not each start's)."""
    run_dir = copy_run(two_steps, tmp_path / "run")
    spent = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["cpu_seconds"]
    assert spent > 0
    train_script.train(compose_cfg([*ARGS, f"run_dir={run_dir}", "trainer.resume=auto",
                                    f"trainer.cpu_budget_s={spent / 2}"]), run_dir)
    assert json.loads((run_dir / "result.json").read_text())["step"] == 2
    assert max(losses(run_dir)) == 2


def test_non_finite_weights_are_never_saved(two_steps, tmp_path):
    """A diverged model is not written over the last good checkpoint."""
    from training.checkpoint import TrainState
    from training.dist import DistInfo

    net = torch.nn.Linear(3, 2)
    state = TrainState(model=net, ema=None, optimizer=None, scaler=None, schedule={}, step=5)
    path = tmp_path / "last.pt"
    state.save(path, DistInfo())
    before = path.read_bytes()
    with torch.no_grad():
        net.weight[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite at step 5"):
        state.save(path, DistInfo())
    assert path.read_bytes() == before


def test_eval_only_without_a_stored_ema_reports_none(tmp_path):
    """A run trained with trainer.ema_decay=null: eval-only reports no EMA top-1 (not a copy of the raw
    weights' top-1 under the EMA's name)."""
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    base = [*ARGS, "trainer.epochs=1", "trainer.max_steps=1"]
    train_script.train(compose_cfg([*base, f"run_dir={train_dir}", "trainer.ema_decay=null"]), train_dir)
    last = train_dir / "checkpoints" / "last.pt"
    train_script.train(compose_cfg([*base, f"run_dir={eval_dir}", "trainer.eval_only=true",
                                    f"trainer.resume={last}"]), eval_dir)
    result = json.loads((eval_dir / "result.json").read_text())
    assert result["top1_ema"] is None and result["top1"] == json.loads((train_dir / "result.json").read_text())["top1"]


def test_a_fine_tune_resumes_without_its_start_weights(tmp_path):
    """model.pretrained is where a run starts, not what it resumes: resumed, the checkpoint's weights
    are loaded and the start file is neither read nor checked (it may be gone; pretrained=true would
    have downloaded)."""
    start = tmp_path / "start.pt"
    torch.save(train_script.hydra.utils.instantiate(compose_cfg([*ARGS]).model).state_dict(), start)
    run_dir = tmp_path / "run"
    args = [*ARGS, f"run_dir={run_dir}", f"model.pretrained={start}"]
    train_script.train(compose_cfg([*args, "trainer.max_steps=2"]), run_dir)
    start.unlink()
    cfg = compose_cfg([*args, "trainer.resume=auto", "trainer.max_steps=4"])
    train_script.validate(cfg)  # the start file's absence is not an error now
    train_script.train(cfg, run_dir)
    assert json.loads((run_dir / "result.json").read_text())["step"] == 4
    with pytest.raises(train_script.ConfigError, match="no such file"):  # a new run still needs it
        train_script.validate(compose_cfg([*ARGS, f"run_dir={tmp_path / 'new'}", f"model.pretrained={start}"]))


def test_eval_only_with_nothing_to_resume_is_refused(tmp_path):
    """eval-only, resume=auto, a run folder with no checkpoint (a typo): an error, not a random model's
    accuracy written as the run's result."""
    cfg = compose_cfg([*ARGS, f"run_dir={tmp_path}", "trainer.eval_only=true", "trainer.resume=auto"])
    with pytest.raises(train_script.ConfigError, match=r"trainer.eval_only=true trainer.resume=auto: no checkpoint in "
                                                       r".*checkpoints to evaluate; give run_dir="):
        train_script.train(cfg, tmp_path)
    assert not (tmp_path / "result.json").exists()


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_file_it_began_from(two_steps, tmp_path):
    """Started with trainer.resume=<file> in a new folder and stopped before that folder's first
    checkpoint: the resume command keeps the file (auto would find nothing and start from scratch)."""
    last = two_steps / "checkpoints" / "last.pt"
    line = train_script.interrupted(tmp_path, [f"trainer.resume={last}", "trainer.epochs=3"])
    assert line.startswith("interrupted at step 2 (the last checkpoint); resume with: python train.py "), line
    assert shlex.split(line.split("resume with: ", 1)[1])[-1] == f"trainer.resume={last}"
    # once the new folder has a checkpoint of its own, that is the one to continue from
    line = train_script.interrupted(copy_run(two_steps, tmp_path / "own"), [f"trainer.resume={last}"])
    assert line.endswith("trainer.resume=auto")


def test_sigterm_stops_a_single_process_run_with_its_resume_command(tmp_path):
    """`kill PID` of a one-process run ends it as Ctrl-C does: one line with the last checkpoint's step
    and the command that continues it; that command resumes, and the config the run started with stays
    in .hydra/ (the resume's own goes to .hydra/resume-<time>/)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    args = [a for a in ARGS if not a.startswith("trainer.epochs")] + ["trainer.epochs=100", f"run_dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (run_dir / "checkpoints" / "last.pt").exists():
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be stopped:\n{proc.stderr.read()[-2000:]}"
        started_with = (run_dir / ".hydra" / "config.yaml").read_text()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-2000:]
    line = err.strip().splitlines()[-1]
    step = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert line.startswith(f"interrupted at step {step} (the last checkpoint); resume with: python train.py "), line
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[-1] == "trainer.resume=auto" and f"run_dir={run_dir.resolve()}" in command
    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), *command[2:], f"trainer.max_steps={step + 1}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["step"] == step + 1
    assert (run_dir / ".hydra" / "config.yaml").read_text() == started_with
    assert len(list((run_dir / ".hydra").glob("resume-*/config.yaml"))) == 1


def val_points(run_dir) -> list[tuple[int, float]]:
    return [(m["step"], m["val/top1"]) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "val/top1" in m]


def test_a_run_stopped_during_an_evaluation_evaluates_first_on_resume(tmp_path, monkeypatch):
    """The epoch-end checkpoint is written before that epoch's evaluation: stopped during the evaluation
    (Ctrl-C), the resume runs it before training on, so no epoch's evaluation is lost."""
    ref_dir = tmp_path / "ref"
    train_script.train(compose_cfg([*ARGS, f"run_dir={ref_dir}"]), ref_dir)
    real, calls = train_script.evaluate_and_log, []

    def stop_in_the_first(run):
        calls.append(run.state.step)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(run)

    monkeypatch.setattr(train_script, "evaluate_and_log", stop_in_the_first)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_script.train(compose_cfg([*ARGS, f"run_dir={run_dir}"]), run_dir)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["evaluated_epoch"]) == (4, 1, 0)
    train_script.train(compose_cfg([*ARGS, f"run_dir={run_dir}", "trainer.resume=auto"]), run_dir)
    assert calls == [4, 4, 8, 12]
    assert val_points(run_dir) == val_points(ref_dir) and [s for s, _ in val_points(ref_dir)] == [4, 8, 12]
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["evaluated_epoch"] == 3  # the last, saved


def test_a_changed_batch_size_restarts_the_epoch_and_new_ranks_keep_their_seeds(two_steps, tmp_path, caplog):
    """trainer.allow_config_change with another batch size, stopped mid-epoch: the sampler position (in
    the old batches) is dropped and the epoch restarts. A rank the checkpoint has no RNG state for keeps
    its own seeding instead of replaying rank 0's draws."""
    from training.checkpoint import TrainState

    run_dir = copy_run(two_steps, tmp_path / "run")
    with caplog.at_level("WARNING", logger="train"):
        train_script.train(compose_cfg([*ARGS, f"run_dir={run_dir}", "trainer.resume=auto", "data.batch_size=16",
                                        "trainer.allow_config_change=true", "trainer.max_steps=3"]), run_dir)
    assert "epoch 0 restarts from its first batch" in caplog.text
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 1)

    net = torch.nn.Linear(2, 2)
    saved = torch.load(two_steps / "checkpoints" / "last.pt", weights_only=True)
    saved = {**saved, "model": net.state_dict(), "ema": None, "optimizer": None}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TrainState(model=net, ema=None, optimizer=None, scaler=None, schedule={}).load_state_dict(saved, rank=1)
    assert torch.equal(torch.rand(3), expected)  # rank 1 of a 1-rank run: its own stream


def test_a_run_stopped_at_an_epoch_end_is_not_evaluated_again_on_resume(tmp_path):
    """trainer.max_steps at an epoch end: the run evaluates and its checkpoint says so; resumed for
    longer, it trains on without evaluating that epoch a second time."""
    run_dir = tmp_path / "run"
    train_script.train(compose_cfg([*ARGS, f"run_dir={run_dir}", "trainer.max_steps=4"]), run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["evaluated_epoch"] == 1
    train_script.train(compose_cfg([*ARGS, f"run_dir={run_dir}", "trainer.resume=auto", "trainer.max_steps=8"]),
                       run_dir)
    assert [s for s, _ in val_points(run_dir)] == [4, 8]
