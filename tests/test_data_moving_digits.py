"""The embedded video task: moving MNIST digits whose class (the direction) needs frame order."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.cluttered_mnist import DIGIT, split_indices
from data.moving_digits import (
    DIRECTIONS,
    MovingDigits,
    MovingDigitsBuilder,
    reverse_class,
    reverse_clip,
    start_ranges,
)
from data.samplers import EvalSampler, TrainSampler


def digit_positions(clip: torch.Tensor, digit: np.ndarray) -> list[tuple[int, int]]:
    """Top-left (x, y) of the digit in every frame of a distractor-free clip (1, T, S, S)."""
    ys, xs = np.nonzero(digit)
    out = []
    for frame in clip[0]:
        fy, fx = torch.nonzero(frame, as_tuple=True)
        out.append((int(fx.min()) - int(xs.min()), int(fy.min()) - int(ys.min())))
    return out


def first_position(clip: torch.Tensor, label: int, digit: np.ndarray) -> tuple[int, int]:
    assert label == 4
    ys, xs = np.nonzero(digit)
    fy, fx = torch.nonzero(clip[0, 0], as_tuple=True)
    return int(fx.min()) - int(xs.min()), int(fy.min()) - int(ys.min())


def test_clip_is_the_digit_moving_in_a_straight_line_inside_the_canvas():
    ds = MovingDigits("train", length=64)
    for index in range(16):
        clip, label = ds[(index, 1000 + index)]
        assert clip.shape == (1, 8, 64, 64) and clip.dtype == torch.uint8 and 0 <= label < 8
        digit = ds.images[index]
        pos = np.array(digit_positions(clip, digit))
        steps = np.diff(pos, axis=0)
        assert (steps == steps[0]).all(), "constant velocity"
        speed = np.abs(steps[0]).max()
        assert 2 <= speed <= 3 and np.array_equal(steps[0], DIRECTIONS[label] * speed)
        assert (pos >= 0).all() and (pos <= 64 - DIGIT).all()
        for (x, y), frame in zip(pos, clip[0], strict=True):  # exactly the digit, nothing else
            assert torch.equal(frame[y:y + DIGIT, x:x + DIGIT], torch.from_numpy(digit))
            assert frame.sum() == int(digit.sum())


def test_items_are_deterministic_per_key_and_digits_stay_in_their_split():
    train, test = MovingDigits("train"), MovingDigits("test")
    a, b = train[(5, 77)], train[(5, 77)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(a[0], train[(5, 78)][0])
    from data.cluttered_mnist import load_mnist_5k

    images, _ = load_mnist_5k()
    assert np.array_equal(test.images, images[split_indices("test", 4000)])
    assert np.array_equal(train.images, images[split_indices("train", 4000)])


def test_reversal_maps_direction_k_to_k_plus_4_with_the_same_start_distribution():
    for k in range(8):
        assert np.array_equal(DIRECTIONS[reverse_class(k)], -DIRECTIONS[k])
        assert reverse_class(reverse_class(k)) == k != reverse_class(k)
        for speed in (1, 2, 3):
            # the reversed clip starts where the forward one ends: the start set shifts by the
            # travel and must be exactly the reversed class's start set (module docstring, step 1)
            travel = DIRECTIONS[k] * speed * 7
            shifted = start_ranges(k, speed, 8, 64) + travel[:, None]
            assert np.array_equal(shifted, start_ranges(reverse_class(k), speed, 8, 64))
    assert torch.equal(reverse_class(torch.arange(8)), torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]))


def test_reverse_option_gives_the_reversed_clip_and_its_mapped_label():
    fwd, rev = MovingDigits("test", num_distractors=2), MovingDigits("test", num_distractors=2, reverse=True)
    for key in list(EvalSampler(len(fwd), seed=0))[:16]:
        (x, y), (xr, yr) = fwd[key], rev[key]
        assert torch.equal(xr, reverse_clip(x)) and torch.equal(xr, x.flip(1)) and yr == reverse_class(y)
        # what an order-blind model sees (the multiset of frames) is the same, the labels differ
        assert sorted(f.numpy().tobytes() for f in x[0]) == sorted(f.numpy().tobytes() for f in xr[0])
        assert yr != y


def test_reversed_clips_start_like_the_class_they_map_to():
    """Reversed class-0 clips and real class-4 clips: the same law of the first digit position
    (both uniform on start_ranges(4, ...)); test clips of index i have direction i mod 8."""
    ds = MovingDigits("test", speed=(2, 2))
    rev = MovingDigits("test", speed=(2, 2), reverse=True)
    real = np.array([first_position(*ds[(4, seed)], ds.images[4]) for seed in range(1000)])
    reversed_ = np.array([first_position(*rev[(8, seed)], rev.images[8]) for seed in range(1000)])
    (x_lo, x_hi), (y_lo, y_hi) = start_ranges(4, 2, 8, 64)
    for starts in (real, reversed_):
        assert starts[:, 0].min() == x_lo and starts[:, 0].max() == x_hi
        assert starts[:, 1].min() == y_lo and starts[:, 1].max() == y_hi
    for axis in (0, 1):  # two-sample Kolmogorov-Smirnov distance of the marginals (0.1% level for 1000 + 1000: 0.087)
        grid = np.arange(64)
        cdf = [np.searchsorted(np.sort(s[:, axis]), grid, side="right") / len(s) for s in (real, reversed_)]
        assert np.abs(cdf[0] - cdf[1]).max() < 0.087


def test_test_labels_are_balanced_and_training_clips_change_every_epoch():
    train, test, spec = MovingDigitsBuilder(train_samples_per_epoch=16, test_samples=1000).build().__dict__.values()
    assert (spec.num_classes, spec.in_chans, spec.image_size, spec.frames, spec.views) == (8, 1, 64, 8, 1)
    assert np.bincount([test[key][1] for key in EvalSampler(len(test), seed=0)]).tolist() == [125] * 8
    s = TrainSampler(len(train), seed=0)
    s.set_epoch(0)
    e0 = sorted(s)
    s.set_epoch(1)
    e1 = sorted(s)
    labels0, labels1 = [train[k][1] for k in e0], [train[k][1] for k in e1]
    assert labels0 != labels1  # same digits, new directions (the digit never predicts the label)
    assert not torch.equal(torch.stack([train[k][0] for k in e0]), torch.stack([train[k][0] for k in e1]))


def test_distractors_are_static_digits_of_the_split():
    clean, cluttered = MovingDigits("test", num_distractors=0), MovingDigits("test", num_distractors=3)
    x, y = clean[(3, 9)]
    xd, yd = cluttered[(3, 9)]
    assert y == yd
    static = xd[0].int() - x[0].int()  # where nothing overlaps, the difference is the distractors
    overlap = (x[0] > 0).any(0)
    assert (static[:, ~overlap] == static[0, ~overlap]).all()
    assert static[0, ~overlap].sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="val"), "split"),
    (dict(num_frames=1), "num_frames"),
    (dict(speed=(3, 2)), "speed"),
    (dict(canvas_size=40), "canvas_size=40 is too small"),
    (dict(num_distractors=-1), "num_distractors"),
    (dict(length=0), "length"),
])  # fmt: skip
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MovingDigits(**kwargs)


def test_the_config_builds_the_task_and_bad_keys_name_themselves():
    from data import builder_from_config
    from train_helpers import compose_cfg

    cfg = compose_cfg(["data=moving_digits"])
    splits = builder_from_config(cfg.data).build()
    assert splits.spec.image_size == splits.val.canvas_size == 64 and splits.spec.frames == 8
    assert len(splits.val) == 1000
    for key, value, match in [("canvas_size", 40, "data.canvas_size=40 is too small"), ("speed", [3, 2], "data.speed"),
                              ("num_frames", 1, "data.num_frames"), ("test_samples", 0, "data.test_samples"),
                              # a split left without a digit of some class (the split is per class)
                              ("num_train_digits", 4999, r"data.num_train_digits=4999: must lie in \[10, 4990\]"),
                              ("num_train_digits", 5, "data.num_train_digits=5")]:
        with pytest.raises(ValueError, match=match):
            builder_from_config(compose_cfg(["data=moving_digits", f"data.{key}={value}"]).data)
