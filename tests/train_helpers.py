"""Shared by the training tests: config composition with tiny overrides and a fake ImageNet."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# SparseFormer-nano shrunk further: a few CPU-seconds per step at most
TINY_MODEL = ["+model.num_tokens=4", "+model.num_points=4", "+model.conv_dim=8", "+model.focusing_dim=16",
              "+model.cortex_dim=32", "+model.cortex_depth=1", "+model.num_heads=2", "+model.focusing_repeats=2"]
TINY_MNIST = ["data.batch_size=8", "data.eval_batch_size=16", "data.train_samples_per_epoch=32",
              "data.test_samples=24", "data.canvas_size=40", "data.num_clutter=2", "data.num_workers=0"]
FAST = ["hardware=cpu", "hardware.num_threads=1", "hardware.processes=1", "logger.log_every_steps=1",
        "logger.num_roi_images=2", "trainer.epochs=2", "trainer.eval_every_epochs=1", "trainer.ema_decay=0.9",
        "schedule.warmup_epochs=0.5"]


def compose_cfg(overrides: list[str]):
    from training.config import register_resolvers

    register_resolvers()  # the configs' ${sparseformer_on_cpu:...}: composed alone, a test file needs them too
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def make_fake_imagenet(root: Path, classes=("n01440764", "n01443537"), per_class=(4, 2), corrupt=True) -> Path:
    """root/{train,val}/<wnid>/*.JPEG of random RGB images of assorted sizes; with `corrupt`, one
    file in train and one in val that are not images at all."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, wnid in enumerate(classes):
            d = root / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(40, 90, 2)
                arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
                arr[..., c] = 255 - c * 100  # a class-dependent colour, so it is learnable
                Image.fromarray(arr).save(d / f"{wnid}_{i}.JPEG", quality=85)
        if corrupt:
            (root / split / classes[0] / "broken.JPEG").write_bytes(b"this is not a jpeg")
    return root


def run_train(args: list[str], cwd: Path = REPO, timeout: int = 300, env_extra: dict | None = None,
              torchrun: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env = {k: v for k, v in env.items() if v is not None}  # env_extra {NAME: None} unsets NAME
    cmd = [sys.executable]
    if torchrun:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    cmd += [str(REPO / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
