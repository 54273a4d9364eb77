"""ImageNet in the standard folder layout: root/{train,val}/<wnid>/*.JPEG, decoded with PIL on
the loader's CPU workers. CPU work is only what must happen per image at its own size
(decode, RandomResizedCrop + flip, or resize + centre-crop for evaluation); everything else runs
batched on the device (`data.augment`)."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import DatasetBuilder, InputSpec, Splits, check_crop, expect, folder_root, is_int, is_num

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def scan_class_folders(split_dir: Path, extensions: tuple[str, ...]) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every file with one of `extensions` under split_dir/<class>/ (any
    depth), and the class names sorted; either may be empty."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    samples = []
    for c, name in enumerate(classes):
        for root, _, files in sorted(os.walk(split_dir / name)):
            samples += [(os.path.join(root, f), c) for f in sorted(files) if f.lower().endswith(extensions)]
    seen = {c for _, c in samples}
    empty = [name for c, name in enumerate(classes) if c not in seen]
    if empty and samples:  # a class that is never seen caps the accuracy without any other sign
        log.warning(
            "%d class folder(s) under %s hold no %s file: %s", len(empty), split_dir, "/".join(extensions),
            ", ".join(empty[:10]) + (", ..." if len(empty) > 10 else ""))
    return samples, classes


def find_samples(split_dir: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every image under split_dir/<class>/, classes sorted by name."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"ImageNet split folder not found: {split_dir} "
                                "(expected root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG)")
    samples, classes = scan_class_folders(split_dir, IMG_EXTENSIONS)
    if not classes:
        raise FileNotFoundError(f"no class folders in {split_dir}")
    if not samples:
        raise FileNotFoundError(f"no images found under {split_dir}")
    return samples, classes


def random_resized_crop_box(w: int, h: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop box (left, top, right, bottom) with torchvision's RandomResizedCrop sampling rule:
    10 tries at area fraction ~ U(scale) and log-uniform aspect ratio, else the centre crop of
    the image clamped to `ratio`."""
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return x, y, x + cw, y + ch
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    x, y = (w - cw) // 2, (h - ch) // 2
    return x, y, x + cw, y + ch


class ImageNetFolder(Dataset):
    """Item key (index, seed) -> (uint8 image (3, S, S), label), or None when the file cannot be
    decoded (logged; `collate_skip_none` drops it and counts it)."""

    in_chans = 3

    def __init__(self, root: str | Path, split: str, image_size: int = 224, train: bool = True,
                 crop_pct: float = 0.875, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5):
        self.root = Path(root)
        self.samples, self.classes = find_samples(self.root / split)
        self.num_classes = len(self.classes)
        self.image_size, self.train, self.crop_pct = image_size, train, crop_pct
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # a corrupt or truncated file must not kill a 300-epoch run
            log.warning("skipping undecodable image %s (%s: %s)", path, type(e).__name__, e)
            return None
        s = self.image_size
        if self.train:
            rng = np.random.default_rng(seed)
            box = random_resized_crop_box(*img.size, rng, self.scale, self.ratio)
            img = img.resize((s, s), Image.BICUBIC, box=box)
            if rng.random() < self.hflip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:  # resize the short side to s / crop_pct (256 for 224), then centre-crop s
            nw, nh, left, top = eval_resize_crop(*img.size, s, self.crop_pct)
            img = img.resize((nw, nh), Image.BICUBIC)
            img = img.crop((left, top, left + s, top + s))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), label



def eval_resize_crop(w: int, h: int, size: int, crop_pct: float) -> tuple[int, int, int, int]:
    """timm's evaluation transform, Resize(floor(size / crop_pct)) then CenterCrop(size), in
    torchvision's integer arithmetic: (resized w, resized h, crop left, crop top). The long side is
    truncated (int), the crop offsets rounded half to even (int(round(...))), as torchvision does, so
    released weights are scored on the pixels their authors scored."""
    short = math.floor(size / crop_pct)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    return nw, nh, int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))


@dataclass
class ImageNetBuilder(DatasetBuilder):
    """conf/data/imagenet.yaml: root/{train,val}/<class>/*.JPEG (root from data.root or $IMAGENET_ROOT);
    RandomResizedCrop + flip for training, resize + centre-crop for evaluation."""

    root: str | None = None
    image_size: int = 224
    crop_pct: float = 0.875
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    def resolved_root(self) -> Path:
        return folder_root(self.root, "IMAGENET_ROOT", "ImageNet")

    def check(self) -> None:
        root = self.resolved_root()
        for split in ("train", "val"):
            expect((root / split).is_dir(), "root", str(root), f"{root / split} does not exist "
                   "(expected root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG)")
        expect(is_int(self.image_size) and self.image_size >= 32, "image_size", self.image_size,
               "must be an integer >= 32")
        expect(is_num(self.crop_pct) and 0 < self.crop_pct <= 1, "crop_pct", self.crop_pct, "must lie in (0, 1]")
        check_crop(self)

    def build(self) -> Splits:
        root = self.resolved_root()
        train = ImageNetFolder(root, "train", self.image_size, train=True, scale=self.scale, ratio=self.ratio,
                               hflip=self.hflip)
        val = ImageNetFolder(root, "val", self.image_size, train=False, crop_pct=self.crop_pct)
        if val.classes != train.classes:
            raise ValueError(f"{root}: train and val hold different class folders")
        return Splits(train, val, InputSpec(train.num_classes, ImageNetFolder.in_chans, self.image_size))
