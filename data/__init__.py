"""Data: the embedded cluttered-MNIST default and ImageNet, as loaders of uint8 batches plus the
device-side batch transforms that finish them (`build_data` is the way in)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .augment import BatchTransform, MixupCutmix, soft_target_cross_entropy
from .cluttered_mnist import ClutteredMNIST
from .imagenet import ImageNetFolder, collate_skip_none
from .samplers import EvalSampler, TrainSampler, steps_per_epoch

__all__ = ["Data", "build_data", "build_datasets", "BatchTransform", "MixupCutmix", "soft_target_cross_entropy", "ClutteredMNIST",
           "ImageNetFolder", "TrainSampler", "EvalSampler", "imagenet_root"]


@dataclass
class Data:
    train_set: Dataset
    val_set: Dataset
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: TrainSampler
    train_transform: BatchTransform
    eval_transform: BatchTransform
    num_classes: int
    in_chans: int
    steps_per_epoch: int


def imagenet_root(cfg) -> Path:
    """data.root, else $IMAGENET_ROOT; a clear error when neither names an existing folder."""
    root = cfg.get("root") or os.environ.get("IMAGENET_ROOT")
    if not root:
        raise FileNotFoundError("data.root is not set: pass data.root=/path/to/imagenet or set IMAGENET_ROOT")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root}: no such directory (expected {root}/train/<wnid>/*.JPEG "
                                f"and {root}/val/<wnid>/*.JPEG)")
    return root


def build_datasets(cfg) -> tuple[Dataset, Dataset]:
    if cfg.name == "cluttered_mnist":
        common = dict(canvas_size=cfg.canvas_size, num_clutter=cfg.num_clutter, clutter_size=cfg.clutter_size,
                      num_train_digits=cfg.num_train_digits)
        return (ClutteredMNIST("train", length=cfg.train_samples_per_epoch, **common),
                ClutteredMNIST("test", length=cfg.test_samples, **common))
    if cfg.name == "imagenet":
        root = imagenet_root(cfg)
        train = ImageNetFolder(root, "train", cfg.image_size, train=True, scale=cfg.scale, ratio=cfg.ratio,
                               hflip=cfg.hflip)
        val = ImageNetFolder(root, "val", cfg.image_size, train=False, crop_pct=cfg.crop_pct)
        if val.classes != train.classes:
            raise ValueError(f"{root}: train and val hold different class folders")
        return train, val
    raise ValueError(f"data.name={cfg.name!r}: unknown dataset (known: cluttered_mnist, imagenet)")


def build_data(cfg, world_size: int = 1, rank: int = 0, seed: int = 0, device=torch.device("cpu")) -> Data:
    train_set, val_set = build_datasets(cfg)
    aug = cfg.augment
    train_sampler = TrainSampler(len(train_set), world_size, rank, seed, repeats=aug.repeats)
    val_sampler = EvalSampler(len(val_set), world_size, rank, seed)
    loader_kw = dict(num_workers=cfg.num_workers, collate_fn=collate_skip_none, pin_memory=device.type == "cuda",
                     persistent_workers=cfg.num_workers > 0)
    # the loaders draw worker seeds from their own generator: the global RNG (saved in
    # checkpoints for resume) must not depend on when an iterator is created
    train_loader = DataLoader(train_set, cfg.batch_size, sampler=train_sampler, drop_last=True,
                              generator=torch.Generator(), **loader_kw)
    val_loader = DataLoader(val_set, cfg.eval_batch_size, sampler=val_sampler, generator=torch.Generator(),
                            **loader_kw)
    num_classes = train_set.num_classes
    mixup = dict(aug.mixup) if aug.get("mixup") else None
    train_tf = BatchTransform(cfg.mean, cfg.std, num_classes, train=True, randaugment=aug.get("randaugment"),
                              random_erasing=aug.random_erasing, mixup=mixup, label_smoothing=aug.label_smoothing)
    eval_tf = BatchTransform(cfg.mean, cfg.std, num_classes, train=False)
    return Data(train_set, val_set, train_loader, val_loader, train_sampler, train_tf.to(device), eval_tf.to(device),
                num_classes, train_set.in_chans, steps_per_epoch(train_sampler, cfg.batch_size))
