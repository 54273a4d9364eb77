"""train.py's generic hooks for the baselines: a model's auxiliary_loss() joins the training loss
(A-ViT's ponder + prior), and trainer.cpu_budget_s stops a run and paces its lr schedule."""
from __future__ import annotations

import json
import time
import types

import pytest
import torch

import train as train_script
from model.avit import AViT
from train_helpers import FAST, TINY_MNIST, compose_cfg
from training.optim import lr_at

TINY_VIT = ["+model.embed_dim=16", "+model.depth=2", "+model.num_heads=2"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_auxiliary_loss_joins_the_training_loss(tmp_path, monkeypatch):
    calls = []

    def constant(self):
        calls.append(self.training)
        return torch.tensor(50.0)

    monkeypatch.setattr(AViT, "auxiliary_loss", constant)
    cfg = compose_cfg(["model=avit_tiny", *TINY_VIT, *TINY_MNIST, *FAST, f"run_dir={tmp_path}", "logger.mode=disabled",
                       "trainer.epochs=1"])
    train_script.train(cfg, tmp_path)
    assert calls == [True] * 4  # once per step (4 steps), in training mode


def test_avit_trains_end_to_end_with_its_losses(tmp_path):
    cfg = compose_cfg(["model=avit_tiny", *TINY_VIT, *TINY_MNIST, *FAST, f"run_dir={tmp_path}", "trainer.epochs=1"])
    top1 = train_script.train(cfg, tmp_path)
    assert 0 <= top1 <= 100
    # conf/data_model/cluttered_mnist_avit_tiny.yaml -> cluttered_mnist_vit.yaml: the ViT recipe, for A-ViT too
    assert cfg.model.img_size == 40 and cfg.model.patch_size == 20 and cfg.model.drop_path_rate == 0.0
    assert cfg.optim.lr == 1e-3
    losses = [m["train/loss"] for m in metrics(tmp_path) if "train/loss" in m]
    assert len(losses) == 4


def test_cpu_budget_stops_the_run_and_paces_the_schedule(tmp_path, monkeypatch):
    clock = iter(range(1000))  # CPU-seconds: one more at every reading
    monkeypatch.setattr(train_script, "time", types.SimpleNamespace(perf_counter=time.perf_counter,
                                                                    process_time=lambda: float(next(clock))))
    cfg = compose_cfg(["+model.num_tokens=4", "+model.num_points=4", "+model.conv_dim=8", "+model.focusing_dim=16",
                       "+model.cortex_dim=32", "+model.cortex_depth=1", "+model.num_heads=2",
                       "+model.focusing_repeats=2", *TINY_MNIST, *FAST, f"run_dir={tmp_path}", "logger.mode=offline",
                       "trainer.epochs=3", "trainer.cpu_budget_s=4"])
    train_script.train(cfg, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 4  # setup reads 0, each step 1, 2, 3, 4: the 4th spends the budget (of 12 steps)
    schedule = dict(base_lr=cfg.optim.lr, total_steps=12, warmup_lr=cfg.schedule.warmup_lr, warmup_steps=2,
                    min_lr=cfg.schedule.min_lr)
    lrs = [m["train/lr"] for m in metrics(tmp_path) if "train/lr" in m]
    # the schedule position is max(step, spent fraction x 12 steps): 0, 3, 6, 9
    assert lrs == pytest.approx([lr_at(p, **schedule) for p in (0, 3, 6, 9)])
    assert len([m for m in metrics(tmp_path) if "val/top1" in m]) == 1  # the final evaluation


def test_cpu_budget_must_be_positive(tmp_path):
    from training.config import ConfigError, validate

    with pytest.raises(ConfigError, match="trainer.cpu_budget_s"):
        validate(compose_cfg([*TINY_MNIST, "trainer.cpu_budget_s=0"]))
