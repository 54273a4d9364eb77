"""ImageNet folder loading, the corrupt-file path, samplers and the device-side recipe."""
from __future__ import annotations

import logging
import math
import random

import pytest
import torch
from omegaconf import OmegaConf

from data import build_data, collate_skip_none
from data.augment import BatchTransform, MixupCutmix, RandomErasing, smooth_one_hot
from data.imagenet import ImageNetFolder, eval_resize_crop, random_resized_crop_box
from data.samplers import EvalSampler, TrainSampler
from train_helpers import make_fake_imagenet


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_fake_imagenet(tmp_path_factory.mktemp("imagenet"))


def test_folder_layout_and_corrupt_file_is_logged_and_skipped(root, caplog):
    ds = ImageNetFolder(root, "train", image_size=32, train=True)
    assert ds.classes == ["n01440764", "n01443537"] and len(ds) == 9
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.JPEG")]
    assert len(broken) == 1
    with caplog.at_level(logging.WARNING):
        assert ds[(broken[0], 0)] is None
    assert "broken.JPEG" in caplog.text
    x, y = ds[(broken[0] + 1, 5)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    images, labels, skipped = collate_skip_none([ds[(i, i)] for i in range(len(ds))])
    assert images.shape == (8, 3, 32, 32) and skipped == 1 and labels.tolist().count(0) == 4


def test_eval_resize_then_centre_crop(root):
    import numpy as np
    from PIL import Image

    ds = ImageNetFolder(root, "val", image_size=32, train=False, crop_pct=0.875)
    i = next(i for i, (p, _) in enumerate(ds.samples) if not p.endswith("broken.JPEG"))
    x, _ = ds[(i, 0)]
    assert x.shape == (3, 32, 32)
    assert torch.equal(x, ds[(i, 99)][0])  # evaluation is deterministic
    im = Image.open(ds.samples[i][0]).convert("RGB")
    nw, nh, left, top = eval_resize_crop(*im.size, 32, 0.875)  # short side -> floor(32 / 0.875) = 36, central 32
    im = im.resize((nw, nh), Image.BICUBIC).crop((left, top, left + 32, top + 32))
    assert torch.equal(x, torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    # torchvision's integers (Resize: int(256 * long / short); CenterCrop: int(round(slack / 2))), worked by
    # hand: 640 x 427 -> 383 x 256 (not 384), crop left round(79.5) = 80 (not 79); 427 x 640 the transpose;
    # 500 x 375 -> 341 x 256, left round(58.5) = 58 (half to even)
    assert eval_resize_crop(640, 427, 224, 0.875) == (383, 256, 80, 16)
    assert eval_resize_crop(427, 640, 224, 0.875) == (256, 383, 16, 80)
    assert eval_resize_crop(500, 375, 224, 0.875) == (341, 256, 58, 16)


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "train")):
        ImageNetFolder(tmp_path / "nope", "train")


def test_random_resized_crop_box_stays_inside():
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(10, 500, 2)
        x1, y1, x2, y2 = random_resized_crop_box(int(w), int(h), rng)
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


def test_repeated_augmentation_sampler_deals_copies_to_different_ranks():
    n, world = 24, 3
    shards = []
    for rank in range(world):
        s = TrainSampler(n, world, rank, seed=1, repeats=3)
        s.set_epoch(2)
        shards.append(list(s))
    assert all(len(sh) == n // world for sh in shards)
    # the first sample of each rank is the same image (3 copies dealt round-robin), different seeds
    firsts = [sh[0] for sh in shards]
    assert len({i for i, _ in firsts}) == 1 and len({seed for _, seed in firsts}) == 3
    # resume: skipping k samples gives the tail of the same list
    s = TrainSampler(n, world, 1, seed=1, repeats=3)
    s.set_epoch(2, start=3)
    assert list(s) == shards[1][3:]


def test_eval_sampler_covers_every_sample_once():
    got = sorted(i for r in range(3) for i, _ in EvalSampler(10, 3, r))
    assert got == list(range(10))


def test_mixup_cutmix_targets_are_distributions():
    torch.manual_seed(0)
    mix = MixupCutmix(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1)
    x, y = torch.rand(6, 3, 16, 16), torch.arange(6) % 5
    for _ in range(10):
        xm, t = mix(x, y)
        assert xm.shape == x.shape and t.shape == (6, 5)
        assert torch.allclose(t.sum(-1), torch.ones(6))
    t = smooth_one_hot(y, 5, 0.1)
    assert t[0, 0] == pytest.approx(0.92) and t[0, 1] == pytest.approx(0.02)


def test_recipe_batch_transform_on_device():
    torch.manual_seed(0)
    tf = BatchTransform([0.5] * 3, [0.25] * 3, num_classes=4, train=True, randaugment={"n": 2, "m": 9},
                        random_erasing=1.0, mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5,
                                                   "prob": 1.0}, label_smoothing=0.1)
    x = (torch.rand(4, 3, 24, 24) * 255).to(torch.uint8)
    out, target = tf(x, torch.tensor([0, 1, 2, 3]))
    assert out.shape == (4, 3, 24, 24) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert target.shape == (4, 4)
    with pytest.raises(ValueError, match="mean has 3 values and std 1: give one per channel"):
        BatchTransform([0.5] * 3, [0.25], num_classes=4, train=False)
    ev = BatchTransform([0.5] * 3, [0.25] * 3, num_classes=4, train=False)
    out, y = ev(x, torch.tensor([0, 1, 2, 3]))
    assert torch.allclose(out, (x.float() / 255 - 0.5) / 0.25) and y.tolist() == [0, 1, 2, 3]


def test_build_data_imagenet_loaders_count_skipped_files(root):
    cfg = OmegaConf.load(__import__("train_helpers").CONF / "data" / "imagenet.yaml")
    cfg.root, cfg.image_size, cfg.batch_size, cfg.eval_batch_size, cfg.num_workers = str(root), 32, 3, 4, 2
    cfg.augment.repeats = 1
    data = build_data(cfg)
    assert data.spec.num_classes == 2 and data.spec.in_chans == 3 and data.spec.image_size == 32
    assert data.steps_per_epoch == 3
    skipped, seen = 0, 0
    data.train_sampler.set_epoch(0)
    for x, _, s in data.train_loader:
        skipped += s
        seen += 0 if x is None else len(x)
    assert skipped + seen == 9 and skipped == 1
    val = [b for b in data.val_loader]
    assert sum(b[2] for b in val) == 1 and sum(len(b[0]) for b in val) == 4


def timm_erasing_box(H, W, rng, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), attempts=10):
    """timm's RandomErasing._erase box loop, written out with Python's random module: (top, left, h, w) or None."""
    for _ in range(attempts):
        target = rng.uniform(*scale) * H * W
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if w < W and h < H:
            return rng.randint(0, H - h), rng.randint(0, W - w), h, w
    return None


def test_random_erasing_is_timms_pixel_mode():
    """DeiT's --reprob 0.25 --remode pixel: per image with probability p one box, area U(0.02, 1/3),
    aspect log-uniform in [0.3, 1/0.3], 10 tries to fit, filled with N(0, 1) noise per pixel and channel;
    the box distribution matches timm's loop (20,000 draws each, on a non-square 64 x 40 image)."""
    torch.manual_seed(0)
    rng = random.Random(0)
    H, W, n = 64, 40, 20000
    ours = RandomErasing(p=1.0).forward_parameters(torch.Size((n, 3, H, W)))
    theirs = [timm_erasing_box(H, W, rng) for _ in range(n)]
    top, left, h, w = ours["box"].double().unbind(1)
    applied = ours["apply"]
    assert abs(applied.double().mean().item() - sum(b is not None for b in theirs) / n) < 0.01
    ref = torch.tensor([b for b in theirs if b is not None], dtype=torch.float64)
    for name, got, want in (("area", (h * w)[applied], ref[:, 2] * ref[:, 3]),
                            ("log aspect", (h / w).log()[applied], (ref[:, 2] / ref[:, 3]).log())):
        for q in (0.1, 0.5, 0.9):
            g, t = got.quantile(q).item(), want.quantile(q).item()
            assert abs(g - t) <= 0.05 * abs(t) + 0.05, (name, q, g, t)
    assert ((top + h <= H) & (left + w <= W) & (top >= 0) & (left >= 0))[applied].all()
    # the fill: noise inside the box, the image untouched outside it and in images not erased
    erasing = RandomErasing(p=0.5)
    x = torch.full((64, 3, H, W), 7.0)
    params = erasing.forward_parameters(x.shape)
    out = erasing(x, params)
    changed = out != 7.0
    for i in range(64):
        t0, l0, hh, ww = params["box"][i].tolist()
        box = torch.zeros(H, W, dtype=torch.bool)
        box[t0:t0 + hh, l0:l0 + ww] = bool(params["apply"][i])
        assert torch.equal(changed[i], box[None].expand(3, -1, -1)), i
    noise = out[changed]
    assert noise.numel() > 1000 and abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1
    assert 20 < int(params["apply"].sum()) < 44  # p = 0.5 of 64
    # a transform moved to fp64 erases in fp64 (its parameters stay CPU draws whatever it is moved to)
    tf = BatchTransform([0.5] * 3, [0.25] * 3, num_classes=4, train=True, random_erasing=1.0).to(torch.float64)
    out, _ = tf((torch.rand(4, 3, 24, 24) * 255).to(torch.uint8), torch.tensor([0, 1, 2, 3]))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
