"""Config checks that fail at start with the key and the reason, and the run-directory resolver."""
from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and says why."""


def run_dir_resolver(run_dir=None) -> str:
    """hydra.run.dir: `run_dir` if given; under torchrun, one folder per rendezvous id, so every
    rank (on every node sharing the filesystem) agrees; else outputs/<date>/<time>."""
    if run_dir not in (None, "None", "null", ""):
        return str(run_dir)
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"outputs/torchrun/{rdzv}"
    return time.strftime("outputs/%Y-%m-%d/%H-%M-%S")


def output_subdir_resolver() -> str | None:
    """hydra.output_subdir: only rank 0 writes the composed config (.hydra/) into the shared run dir."""
    return ".hydra" if os.environ.get("RANK", "0") == "0" else None


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sparseformer_run_dir"):
        OmegaConf.register_new_resolver("sparseformer_run_dir", run_dir_resolver)
    if not OmegaConf.has_resolver("sparseformer_output_subdir"):
        OmegaConf.register_new_resolver("sparseformer_output_subdir", output_subdir_resolver)


def _get(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default="__absent__")
    if value == "__absent__":
        raise ConfigError(f"{key}: missing from the config")
    return value


def _check(cfg, key, ok, why):
    value = _get(cfg, key)
    if not ok(value):
        raise ConfigError(f"{key}={value!r}: {why}")
    return value


def _int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def resolve_hardware(hw) -> tuple[str, str, str]:
    """(device, precision, dist backend) with every `auto` decided for this machine."""
    import torch

    device = hw.device if hw.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = hw.precision
    if precision == "auto":
        precision = "fp32" if device == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    backend = hw.dist_backend if hw.dist_backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    return device, precision, backend


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key. Called before anything expensive happens."""
    _check(cfg, "data.name", lambda v: v in ("cluttered_mnist", "imagenet"), "must be cluttered_mnist or imagenet")
    _check(cfg, "data.batch_size", lambda v: _int(v) and v > 0, "batch size must be a positive integer")
    _check(cfg, "data.eval_batch_size", lambda v: _int(v) and v > 0, "batch size must be a positive integer")
    _check(cfg, "data.num_workers", lambda v: _int(v) and v >= 0, "must be an integer >= 0")
    _check(cfg, "data.augment.repeats", lambda v: _int(v) and v >= 1, "repeated augmentation count must be >= 1")
    _check(cfg, "data.augment.label_smoothing", lambda v: _num(v) and 0 <= v < 1, "must lie in [0, 1)")
    _check(cfg, "data.augment.random_erasing", lambda v: _num(v) and 0 <= v <= 1, "is a probability, in [0, 1]")
    if cfg.data.name == "imagenet":
        root = _get(cfg, "data.root") or os.environ.get("IMAGENET_ROOT")
        if not root:
            raise ConfigError("data.root=None: ImageNet needs a folder; pass data.root=/path/to/imagenet "
                              "or set the IMAGENET_ROOT environment variable")
        for split in ("train", "val"):
            if not (Path(root).expanduser() / split).is_dir():
                raise ConfigError(f"data.root={root!r}: {Path(root) / split} does not exist "
                                  "(expected root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG)")
        _check(cfg, "data.image_size", lambda v: _int(v) and v >= 32, "must be an integer >= 32")
    else:
        _check(cfg, "data.canvas_size", lambda v: _int(v) and v >= 28, "the canvas must hold a 28x28 digit")
        _check(cfg, "data.num_clutter", lambda v: _int(v) and v >= 0, "must be an integer >= 0")
        _check(cfg, "data.train_samples_per_epoch", lambda v: _int(v) and v > 0, "must be a positive integer")

    _check(cfg, "trainer.epochs", lambda v: _int(v) and v > 0, "must be a positive integer")
    _check(cfg, "trainer.max_steps", lambda v: v is None or (_int(v) and v > 0), "must be null or a positive integer")
    _check(cfg, "trainer.ckpt_every_steps", lambda v: v is None or (_int(v) and v > 0), "must be null or > 0")
    _check(cfg, "trainer.eval_every_epochs", lambda v: _int(v) and v > 0, "must be a positive integer")
    _check(cfg, "trainer.ema_decay", lambda v: v is None or (_num(v) and 0 < v < 1), "must be null or in (0, 1)")
    resume = _get(cfg, "trainer.resume")
    if resume not in (None, False, "auto") and not Path(str(resume)).is_file():
        raise ConfigError(f"trainer.resume={resume!r}: must be null, 'auto', or an existing checkpoint file")
    ckpt = _get(cfg, "trainer.checkpoint")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(f"trainer.checkpoint={ckpt!r}: no such file")
    _check(cfg, "trainer.checkpoint_format", lambda v: v in ("auto", "ours", "official"), "must be auto, ours or official")
    if _get(cfg, "trainer.eval_only") and ckpt is None and resume is None:
        raise ConfigError("trainer.eval_only=True: needs trainer.checkpoint=<file> (or trainer.resume) to evaluate")

    _check(cfg, "optim.lr", lambda v: v is None or (_num(v) and v > 0), "must be null (scaled from base_lr) or > 0")
    _check(cfg, "optim.base_lr", lambda v: _num(v) and v > 0, "must be > 0")
    _check(cfg, "optim.base_batch_size", lambda v: _int(v) and v > 0, "must be a positive integer")
    _check(cfg, "optim.weight_decay", lambda v: _num(v) and v >= 0, "must be >= 0")
    _check(cfg, "optim.clip_grad", lambda v: v is None or (_num(v) and v > 0), "must be null or > 0")
    _check(cfg, "schedule.warmup_epochs", lambda v: _num(v) and v >= 0, "must be >= 0")
    _check(cfg, "schedule.min_lr", lambda v: _num(v) and v >= 0, "must be >= 0")

    _check(cfg, "hardware.device", lambda v: v in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda")
    _check(cfg, "hardware.precision", lambda v: v in ("auto", "fp32", "bf16", "fp16"), "must be auto, fp32, bf16 or fp16")
    _check(cfg, "hardware.dist_backend", lambda v: v in ("auto", "gloo", "nccl"), "must be auto, gloo or nccl")
    if cfg.hardware.device == "cpu" and cfg.hardware.dist_backend == "nccl":
        raise ConfigError("hardware.dist_backend='nccl': NCCL needs CUDA; use gloo with hardware.device=cpu")
    _check(cfg, "hardware.num_threads", lambda v: v is None or (_int(v) and v > 0), "must be null or > 0")
    _check(cfg, "hardware.processes", lambda v: _int(v) and v > 0, "must be a positive integer (local processes)")
    _check(cfg, "logger.mode", lambda v: v in ("offline", "online", "disabled"), "must be offline, online or disabled")
    _check(cfg, "logger.log_every_steps", lambda v: _int(v) and v > 0, "must be a positive integer")
    _check(cfg, "logger.num_roi_images", lambda v: _int(v) and v >= 0, "must be an integer >= 0")
    _check(cfg, "model._target_", lambda v: isinstance(v, str), "must name the model factory")
