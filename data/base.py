"""The dataset plug-in protocol (see the package docstring): a `DatasetBuilder` per dataset, the
`InputSpec` it reports to the model, and `builder_from_config`, which turns a `conf/data/*.yaml` node
into its builder, checking every key the builder owns."""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

# Keys every data config has, read by the shared loaders and batch transforms (data/__init__.py),
# not by the builder: everything else in the YAML is the builder's own.
COMMON_KEYS = ("_target_", "name", "batch_size", "eval_batch_size", "num_workers", "mean", "std", "augment")


@dataclass(frozen=True)
class InputSpec:
    """What the model must take from a dataset: classes, input channels, the side of the square
    images (or frames) the loaders yield, for clips the frames per clip (None for images), and the
    views per evaluation item (> 1: the evaluation set yields (V, C, [T,] H, W) items whose softmax
    probabilities are averaged, e.g. Kinetics' clips x crops)."""

    num_classes: int
    in_chans: int
    image_size: int
    frames: int | None = None
    views: int = 1

    def model_kwargs(self) -> dict:
        """The model constructor keys every model takes from its dataset. Sizes are not among them: most
        models run at any image size or clip length; one that is built for a fixed size takes it from a
        conf/data_model/<data>_<model>.yaml (DeiT's img_size, ViViT's num_frames)."""
        return {"num_classes": self.num_classes, "in_chans": self.in_chans}


def fold_views(x: torch.Tensor) -> torch.Tensor:
    """Evaluation views (B, V, C, [T,] H, W) -> a batch (B·V, C, [T,] H, W), item b·V + v = view v of b."""
    return x.flatten(0, 1)


def average_view_probs(logits: torch.Tensor, num_views: int) -> torch.Tensor:
    """Logits of folded views (B·V, K) -> the clip's class probabilities averaged over its V views,
    (B, K), in fp32 whatever the autocast dtype: the softmax of each view, then the mean, as VideoMAE
    (`merge`), mmaction2 (`average_clips='prob'`) and SlowFast score multi-view tests."""
    return logits.float().softmax(-1).view(-1, num_views, logits.shape[-1]).mean(1)


@dataclass
class Splits:
    """A dataset's train and evaluation sets, and what the model must take from them."""

    train: Dataset
    val: Dataset
    spec: InputSpec


def expect(ok: bool, key: str, value, why: str) -> None:
    """A builder's key check: raise ValueError("data.<key>=<value>: <why>") unless `ok`."""
    if not ok:
        raise ValueError(f"data.{key}={value!r}: {why}")


def folder_root(root: str | None, env_var: str, dataset: str) -> Path:
    """data.root, else $<env_var>; a ValueError naming both when neither is set."""
    root = root or os.environ.get(env_var)
    if not root:
        raise ValueError(f"data.root=None: {dataset} needs a folder; pass data.root=/path/to/{dataset.lower()} "
                         f"or set the {env_var} environment variable")
    return Path(root).expanduser()


def check_crop(builder, hflip_key: str = "hflip") -> None:
    """The random-resized-crop keys `scale`, `ratio` ([low, high], 0 < low <= high) and the flip probability."""
    hflip = getattr(builder, hflip_key)
    expect(is_num(hflip) and 0 <= hflip <= 1, hflip_key, hflip, "is a probability, in [0, 1]")
    for key in ("scale", "ratio"):
        lo_hi = getattr(builder, key)
        expect(len(lo_hi) == 2 and all(is_num(v) for v in lo_hi) and 0 < lo_hi[0] <= lo_hi[1], key, lo_hi,
               "must be [low, high] with 0 < low <= high")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class DatasetBuilder:
    """Base of a dataset plug-in. A subclass is a dataclass whose fields (with defaults) are its own
    keys of `conf/data/<name>.yaml`; `check` validates them without touching the data, `build`
    makes the splits. `yields_clips`: its items are clips (C, T, H, W), for models that take clips
    (checked against the model at start, training.config.validate)."""

    yields_clips: ClassVar[bool] = False

    def check(self) -> None:
        """Raise ValueError naming `data.<key>` for a value that cannot work. Runs at start (config
        validation, before any process is launched), so it must be cheap: no decoding, no scans."""

    def build(self) -> Splits:
        raise NotImplementedError(f"{type(self).__name__}.build")

    def batch_transforms(self, cfg, spec: InputSpec) -> tuple[nn.Module, nn.Module]:
        """(train, eval) device-side transforms of the loaders' uint8 batches, from the common keys
        (mean, std, augment): data.augment.BatchTransform for images (B, C, H, W); a clip dataset
        returns `self.transform_class()` = data.video_augment.VideoBatchTransform."""
        transform = self.transform_class()
        aug = cfg.augment
        mixup = dict(aug.mixup) if aug.get("mixup") else None
        train = transform(cfg.mean, cfg.std, spec.num_classes, train=True, randaugment=aug.get("randaugment"),
                          random_erasing=aug.random_erasing, mixup=mixup, label_smoothing=aug.label_smoothing)
        return train, transform(cfg.mean, cfg.std, spec.num_classes, train=False)

    @staticmethod
    def transform_class() -> type:
        from .augment import BatchTransform

        return BatchTransform


def builder_from_config(cfg) -> DatasetBuilder:
    """The builder that `cfg._target_` names, made from the config's own keys and checked.

    Raises ValueError naming the key: a missing or unknown `_target_`, a key the builder does not
    have (with the keys it has), or a value its `check` rejects."""
    target = cfg.get("_target_")
    if not isinstance(target, str) or "." not in target:
        raise ValueError(f"data._target_={target!r}: must name the dataset's builder class, e.g. "
                         "data.imagenet.ImageNetBuilder (conf/data/*.yaml)")
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"data._target_={target!r}: cannot import it ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, DatasetBuilder)):
        raise ValueError(f"data._target_={target!r}: not a data.base.DatasetBuilder subclass")
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    own = {k: v for k, v in plain.items() if k not in COMMON_KEYS}
    accepted = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(own) - accepted)
    if unknown:
        raise ValueError(f"data.{unknown[0]}: not a key of {class_name} (its keys: {', '.join(sorted(accepted))}; "
                         f"shared keys: {', '.join(COMMON_KEYS[1:])})")
    builder = cls(**own)
    builder.check()
    return builder
