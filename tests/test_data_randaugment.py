"""timm's RandAugment on the device (data/randaugment.py): each op against PIL's (what timm runs), the
level -> argument mapping, and the per-sample draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from data.randaugment import OPS, RandAugment

MEAN = (0.485, 0.456, 0.406)
FILL = tuple(round(255 * m) for m in MEAN)


@pytest.fixture(scope="module")
def image():
    """A 40 x 32 RGB image with structure (gradients, a bright square, noise), as uint8 (H, W, 3)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:40]
    img = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + rng.integers(0, 40, (32, 40, 3))
    img[8:16, 10:20] = 230
    return np.clip(img, 0, 255).astype(np.uint8)


def ours(name, img, level=9.0, sign=1.0):
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    out = RandAugment(fill=MEAN).apply_op(name, x, torch.tensor([level]), torch.tensor([sign]))
    return out[0].permute(1, 2, 0).numpy() * 255


PIL_OPS = {  # timm's functions at level 9 (v = 0.9), sign +1
    "AutoContrast": lambda im: ImageOps.autocontrast(im),
    "Equalize": lambda im: ImageOps.equalize(im),
    "Invert": lambda im: ImageOps.invert(im),
    "PosterizeIncreasing": lambda im: ImageOps.posterize(im, 4 - int(0.9 * 4)),
    "SolarizeIncreasing": lambda im: ImageOps.solarize(im, 256 - int(0.9 * 256)),
    "SolarizeAdd": lambda im: im.point([min(255, i + int(0.9 * 110)) if i < 128 else i for i in range(256)] * 3),
    "ColorIncreasing": lambda im: ImageEnhance.Color(im).enhance(1 + 0.81),
    "ContrastIncreasing": lambda im: ImageEnhance.Contrast(im).enhance(1 + 0.81),
    "BrightnessIncreasing": lambda im: ImageEnhance.Brightness(im).enhance(1 + 0.81),
    "SharpnessIncreasing": lambda im: ImageEnhance.Sharpness(im).enhance(1 + 0.81),
}


@pytest.mark.parametrize("name", sorted(PIL_OPS))
def test_pixel_ops_match_pil(image, name):
    expected = np.asarray(PIL_OPS[name](Image.fromarray(image)), dtype=np.float64)
    got = ours(name, image)
    # PIL rounds to uint8 at each step (its grey image too, and Contrast its grey mean): a level or two
    tolerance = {"ContrastIncreasing": 3.0, "ColorIncreasing": 1.5, "SharpnessIncreasing": 1.5}.get(name, 1.01)
    assert np.abs(got - expected).max() <= tolerance, name


@pytest.mark.parametrize("name, pil_matrix", [
    ("TranslateXRel", (1, 0, 0.45 * 0.9 * 40, 0, 1, 0)),
    ("TranslateYRel", (1, 0, 0, 0, 1, 0.45 * 0.9 * 32)),
    ("ShearX", (1, 0.27, 0, 0, 1, 0)),
    ("ShearY", (1, 0, 0, 0.27, 1, 0)),
])
def test_geometric_ops_match_pil(image, name, pil_matrix):
    """PIL's affine transform (as timm calls it, bilinear, the mean pixel as fill) on the interior,
    away from where bilinear weights meet the fill."""
    pil = Image.fromarray(image).transform((40, 32), Image.AFFINE, pil_matrix, resample=Image.BILINEAR,
                                           fillcolor=FILL)
    expected = np.asarray(pil, dtype=np.float64)
    got = ours(name, image)
    inside = np.abs(got - expected).max(-1) < 3
    assert inside.mean() > 0.9, (name, inside.mean())
    fill = (expected == FILL).all(-1)
    for _ in range(2):  # 2 pixels in from PIL's fill border (bilinear weights meet the fill there)
        f = np.pad(fill, 1, constant_values=True)
        fill = f[1:-1, 1:-1] & f[:-2, 1:-1] & f[2:, 1:-1] & f[1:-1, :-2] & f[1:-1, 2:]
    assert fill.sum() > 20 and np.abs(got[fill] - np.array(FILL)).max() < 1.5  # outside: the mean pixel


def test_rotate_matches_pil_up_to_its_sign(image):
    got = ours("Rotate", image)
    diffs = [np.abs(got - np.asarray(Image.fromarray(image).rotate(d, resample=Image.BILINEAR, fillcolor=FILL),
                                    dtype=np.float64)).max(-1) for d in (27, -27)]
    assert max((d < 3).mean() for d in diffs) > 0.9


def test_draws_follow_timms_rand_m9_mstd05():
    """Ops uniform over the 15 (chosen per image, with replacement over the layers), each applied with
    probability 0.5, levels N(9, 0.5) clipped to [0, 10], signs ±1 equally."""
    torch.manual_seed(0)
    p = RandAugment(n=2, m=9, mstd=0.5).forward_parameters(torch.Size((20000, 3, 8, 8)))
    counts = torch.bincount(p["op"].flatten(), minlength=len(OPS)).float() / p["op"].numel()
    assert (counts - 1 / len(OPS)).abs().max() < 0.01
    assert abs(p["apply"].float().mean().item() - 0.5) < 0.01
    assert p["level"].min() >= 0 and p["level"].max() <= 10
    assert abs(p["level"].mean().item() - 9) < 0.02 and abs(p["level"].std().item() - 0.5) < 0.03
    assert abs(p["sign"].mean().item()) < 0.02
    assert len({tuple(r) for r in p["op"][:64].tolist()}) > 40  # per image, not one choice per batch


def test_forward_applies_each_images_own_draw(image):
    """forward(x, params) = each image through its chosen ops in order; params drawn once replay exactly."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).repeat(6, 1, 1, 1)
    ra = RandAugment(n=2, m=9, fill=MEAN)
    torch.manual_seed(1)
    params = ra.forward_parameters(x.shape)
    out = ra(x, params)
    torch.testing.assert_close(ra(x, params), out)
    for b in range(6):
        expected = x[b:b + 1]
        for layer in range(2):
            if params["apply"][b, layer]:
                expected = ra.apply_op(OPS[params["op"][b, layer]], expected, params["level"][b, layer:layer + 1],
                                       params["sign"][b, layer:layer + 1])
        torch.testing.assert_close(out[b:b + 1], expected)


def test_bad_settings_and_shapes_are_errors():
    with pytest.raises(ValueError, match=r"randaugment\.m=27.*\[0, 10\]"):
        RandAugment(m=27)
    with pytest.raises(ValueError, match=r"expects images \(B, 3, H, W\)"):
        RandAugment(fill=MEAN)(torch.rand(2, 1, 8, 8))


def test_an_unknown_randaugment_key_is_named():
    from data.augment import BatchTransform

    with pytest.raises(ValueError, match=r"unknown key\(s\) \['magnitude'\]"):
        BatchTransform(MEAN, (0.2,) * 3, num_classes=4, train=True, randaugment={"n": 2, "magnitude": 9})


def test_no_op_reads_the_device_back(monkeypatch):
    """The CPU stand-in for the GPU check (tests/test_data_augment_gpu.py): on the meta device, where
    any device-to-host read would have to be recorded, every op of 10 batches runs without one (the
    draws and the choice of each op's images stay on the CPU)."""
    reads = []
    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        original = getattr(torch.Tensor, name)

        def recording(self, *args, _original=original, _name=name, **kwargs):
            if self.device.type == "meta":
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, recording)
    ra = RandAugment(n=2, m=9, fill=MEAN).to("meta")
    torch.manual_seed(0)
    for _ in range(10):
        out = ra(torch.empty(64, 3, 16, 16, device="meta"))
    assert reads == [] and out.device.type == "meta"
