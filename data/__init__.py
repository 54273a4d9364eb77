"""Data: datasets as plug-ins, and the samplers, loaders and device-side batch transforms they all
share. `build_data(cfg.data, ...)` is the way in; `conf/data/<name>.yaml` picks the dataset.

Adding a dataset is one module and one YAML, nothing else (no registry, no `if` anywhere):

1. `data/<name>.py` holds a `data.base.DatasetBuilder` subclass: a dataclass whose fields (with
   defaults) are the dataset's own config keys, and
   - `check()`: raise ValueError naming the key (`data.base.expect` formats "data.<key>=<value>: why")
     for a value that cannot work. It runs at start, before any process is launched, so it must be
     cheap (look at paths, not at files);
   - `build() -> Splits(train, val, spec)`: two `torch.utils.data.Dataset`s and an `InputSpec`
     (num_classes, in_chans, image_size, and frames for clips), which says what the model must take:
     train.py passes `spec.model_kwargs()` (num_classes, in_chans) to the model and counts MACs at
     image_size; a model built for a fixed size or clip length (DeiT's img_size, ViViT's num_frames)
     takes it in `conf/data_model/<data>_<model>.yaml`.
   Items are read by key `(index, seed)`, as the samplers (data/samplers.py) yield them: the seed fixes
   every random choice of that item (crop, flip, frame offset), so a resumed run replays its data and
   the number of loader workers does not matter. An item is `(uint8 tensor, int label)`, images
   (C, H, W), clips (C, T, H, W); an undecodable file returns None (log a warning naming it): the
   loaders drop it and count it. Normalisation and batch augmentation run on the device
   (`batch_transforms`, from the shared keys; a clip dataset overrides `transform_class()`).
2. `conf/data/<name>.yaml` names the builder, `_target_: data.<name>.<Builder>`, and holds the shared
   keys (`name`, `batch_size` per process, `eval_batch_size`, `num_workers`, `mean`, `std`, `augment`)
   and the builder's own keys. A key the builder does not have is an error at start.

Then `python train.py data=<name>` trains on it, and the config tests compose and check it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from .augment import BatchTransform, MixupCutmix
from .base import COMMON_KEYS, DatasetBuilder, InputSpec, Splits, average_view_probs, builder_from_config, fold_views
from .samplers import EvalSampler, TrainSampler, steps_per_epoch

log = logging.getLogger(__name__)

__all__ = ["COMMON_KEYS", "Data", "average_view_probs", "fold_views", "DatasetBuilder", "InputSpec", "Splits",
           "build_data", "builder_from_config", "collate_skip_none", "BatchTransform", "MixupCutmix", "TrainSampler",
           "EvalSampler"]


@dataclass
class Data:
    train_set: Dataset
    val_set: Dataset
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: TrainSampler
    train_transform: BatchTransform
    eval_transform: BatchTransform
    spec: InputSpec
    steps_per_epoch: int


def collate_skip_none(batch):
    """Stack (item, label) pairs, dropping the None of undecodable files.
    Returns items (B, ...) uint8, labels (B,), and the number of skipped files."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    images = torch.stack([b[0] for b in good])
    labels = torch.tensor([b[1] for b in good], dtype=torch.long)
    return images, labels, skipped


def build_data(cfg, world_size: int = 1, rank: int = 0, seed: int = 0, device: torch.device | None = None) -> Data:
    """The dataset `cfg._target_` names, sharded over `world_size` ranks, as loaders of uint8 batches
    plus the device-side transforms that finish them."""
    device = device or torch.device("cpu")
    builder = builder_from_config(cfg)
    splits = builder.build()
    train_sampler = TrainSampler(len(splits.train), world_size, rank, seed, repeats=cfg.augment.repeats)
    if cfg.augment.repeats > world_size and rank == 0:
        log.warning("data.augment.repeats=%d with %d process(es): a rank gets several copies of an item in a row, "
                    "mostly in one batch; repeated augmentation (DeiT) spreads an item's copies over as many ranks "
                    "as repeats: set data.augment.repeats=%d (or 1) here", cfg.augment.repeats, world_size,
                    world_size)
    val_sampler = EvalSampler(len(splits.val), world_size, rank)  # one test set for every run seed
    loader_kw = dict(num_workers=cfg.num_workers, collate_fn=collate_skip_none, pin_memory=device.type == "cuda",
                     persistent_workers=cfg.num_workers > 0)
    # the loaders draw worker seeds from their own generator: the global RNG (saved in
    # checkpoints for resume) must not depend on when an iterator is created
    train_loader = DataLoader(splits.train, cfg.batch_size, sampler=train_sampler, drop_last=True,
                              generator=torch.Generator(), **loader_kw)
    val_loader = DataLoader(splits.val, cfg.eval_batch_size, sampler=val_sampler, generator=torch.Generator(),
                            **loader_kw)
    if len(cfg.mean) != splits.spec.in_chans:  # (a mismatch failed at the first batch, inside the transform)
        raise ValueError(f"data.mean/std have {len(cfg.mean)} values but data={cfg.get('name')} has "
                         f"{splits.spec.in_chans} input channel(s): give one per channel")
    train_tf, eval_tf = builder.batch_transforms(cfg, splits.spec)
    return Data(splits.train, splits.val, train_loader, val_loader, train_sampler, train_tf.to(device),
                eval_tf.to(device), splits.spec, steps_per_epoch(train_sampler, cfg.batch_size))
