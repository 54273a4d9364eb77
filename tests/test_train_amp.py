"""AMP on the CPU: bf16 autocast, and fp16 with a GradScaler whose scale reaches the model's
sampling-gradient clamp (model.sampling_grad_scale, docs/MODEL.md step 4)."""
from __future__ import annotations

import json
import math

import hydra
import pytest
import torch

import train as train_script
from train_helpers import FAST, TINY_MNIST, TINY_MODEL, compose_cfg


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_trains_and_feeds_the_loss_scale_to_the_sampling_clamp(precision, tmp_path, monkeypatch):
    built = []
    real_instantiate = hydra.utils.instantiate

    def spy(*args, **kwargs):
        built.append(real_instantiate(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(train_script.hydra.utils, "instantiate", spy)
    cfg = compose_cfg([*TINY_MODEL, *TINY_MNIST, *FAST, f"hardware.precision={precision}", "trainer.epochs=1",
                       "logger.mode=disabled", "logger.num_roi_images=0", f"run_dir={tmp_path}"])
    train_script.train(cfg, tmp_path)
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    (model,) = built
    if precision == "fp16":
        assert state["scaler"]["scale"] > 1.0
        assert model.sampling_grad_scale == state["scaler"]["scale"]  # no inf in 4 steps: the scale never moved
    else:
        assert state["scaler"] == {} and model.sampling_grad_scale == 1.0  # GradScaler off for bf16


@pytest.mark.parametrize("saved, resumed", [("bf16", "fp16"), ("fp32", "fp16"), ("fp16", "bf16")])
def test_resume_across_precisions(saved, resumed):
    """A checkpoint of a run without fp16 holds an empty scaler state; resuming or evaluating it with fp16
    (e.g. bf16 weights on a V100) starts a fresh scale instead of failing on the empty state."""
    from training.checkpoint import TrainState

    def state(precision):
        m = torch.nn.Linear(2, 2)
        return TrainState(model=m, optimizer=torch.optim.AdamW(m.parameters()),
                          scaler=torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=precision == "fp16"))

    ckpt = state(saved).state_dict(rng=[])
    target = state(resumed)
    target.load_state_dict(ckpt)
    if resumed == "fp16":
        assert target.scaler.get_scale() == 1024.0


def test_loss_scale_reaches_a_sparseformer_inside_a_wrapper():
    """The frame-averaged baseline holds its SparseFormer one level down; under fp16 its clamp must follow
    the loss scale too (else it clamps scaled gradients to +-1/size and the RoIs freeze)."""
    import model as models

    wrapper = models.create_model("framewise_sparseformer_nano", num_classes=4, in_chans=1)
    train_script.set_sampling_grad_scale(wrapper, 4096.0)
    assert wrapper.image_model.sampling_grad_scale == 4096.0


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_one_overflowing_step(precision, tmp_path, monkeypatch):
    """A forward that overflows on one batch: under fp16 the GradScaler skips that step and the run goes
    on (the step is counted in train/nonfinite_steps); without a scaler the weights take the NaN, so the
    run stops with the step named."""
    real, calls = train_script.soft_target_cross_entropy, []

    def overflow_once(logits, target):
        calls.append(1)
        loss = real(logits, target)
        return loss * float("inf") if len(calls) == 2 else loss

    monkeypatch.setattr(train_script, "soft_target_cross_entropy", overflow_once)
    cfg = compose_cfg([*TINY_MODEL, *TINY_MNIST, *FAST, f"hardware.precision={precision}", "trainer.epochs=1",
                       "logger.mode=disabled", "logger.num_roi_images=0", f"run_dir={tmp_path}"])
    if precision == "fp32":
        with pytest.raises(FloatingPointError, match="not finite at step 2 .1 of the 1 rank-steps"):
            train_script.train(cfg, tmp_path)
        return
    train_script.train(cfg, tmp_path)
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "train/nonfinite_steps" in line]
    assert [r["train/nonfinite_steps"] for r in logs] == [0, 1, 0, 0]
    assert ["train/loss" in r for r in logs] == [True, False, True, True]
    assert all(math.isfinite(r["train/loss"]) for r in logs if "train/loss" in r)
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 4


def test_matmul_precision_is_the_runs_choice(tmp_path):
    """hardware.matmul_precision sets torch's fp32 matmul precision for the run (TF32 opt-in on GPUs;
    the Triton kernels' fp32 dots follow it too)."""
    before = torch.get_float32_matmul_precision()
    try:
        cfg = compose_cfg([*TINY_MODEL, *TINY_MNIST, *FAST, "hardware.matmul_precision=high", "trainer.max_steps=1",
                           "logger.mode=disabled", "logger.num_roi_images=0", f"run_dir={tmp_path}"])
        train_script.train(cfg, tmp_path)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
