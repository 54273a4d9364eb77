"""Device-side clip transforms: the image recipe with one draw per clip, shared by its frames."""
from __future__ import annotations

import pytest
import torch

from data.video_augment import SameOnFrames, VideoBatchTransform, repeat_params

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def static_clips(b=4, t=3, size=16) -> torch.Tensor:
    """uint8 (B, 3, T, S, S) whose frames are all the same picture (a different one per clip)."""
    return (torch.rand(b, 3, 1, size, size) * 255).to(torch.uint8).expand(b, 3, t, size, size).contiguous()


def test_evaluation_normalises_clips_and_test_views():
    tf = VideoBatchTransform(MEAN, STD, num_classes=5, train=False)
    x, y = static_clips(), torch.arange(4)
    out, labels = tf(x, y)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(3, 1, 1, 1)) / torch.tensor(STD).view(3, 1, 1, 1)
    torch.testing.assert_close(out, expected)
    assert labels is y
    views = x[:, None].expand(4, 6, *x.shape[1:])  # (B, V, C, T, H, W)
    torch.testing.assert_close(tf(views, y)[0], expected[:, None].expand_as(views.float()))


def test_wrong_layouts_are_refused():
    tf = VideoBatchTransform(MEAN, STD, num_classes=5, train=True)
    with pytest.raises(ValueError, match=r"clips \(B, C, T, H, W\), got shape \(2, 3, 16, 16\)"):
        tf(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="1 channels"):
        VideoBatchTransform(MEAN, STD, 5, train=False)(torch.zeros(2, 1, 2, 8, 8, dtype=torch.uint8), None)


def test_repeat_params_gives_every_frame_its_clips_draw():
    params = {"box": torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), "group": torch.arange(2), "order": 0}
    out = repeat_params(params, batch=2, times=3)
    assert out["box"].tolist() == [[1, 2, 3, 4]] * 3 + [[5, 6, 7, 8]] * 3
    assert out["group"].tolist() == [0, 0, 0, 1, 1, 1] and out["order"] == 0 and params["group"].tolist() == [0, 1]


def test_randaugment_erasing_and_cutmix_are_the_same_on_every_frame():
    torch.manual_seed(1)
    tf = VideoBatchTransform(MEAN, STD, num_classes=5, train=True, randaugment={"n": 2, "m": 9}, random_erasing=1.0,
                             mixup={"mixup_alpha": 0.0, "cutmix_alpha": 1.0, "prob": 1.0}, label_smoothing=0.1)
    x, y = static_clips(), torch.arange(4)
    plain = VideoBatchTransform(MEAN, STD, num_classes=5, train=False)(x, y)[0]
    changed = 0
    for _ in range(6):
        out, target = tf(x, y)
        assert out.shape == x.shape and target.shape == (4, 5)
        torch.testing.assert_close(out, out[:, :, :1].expand_as(out))  # still static: one draw per clip
        changed += not torch.allclose(out, plain)
    assert changed == 6
    erasing = SameOnFrames(tf.erasing.aug)
    out = erasing(torch.ones(8, 3, 2, 16, 16))  # (B, C, T, H, W): noise boxes
    assert torch.equal(out[:, :, 0], out[:, :, 1])  # the same box and the same noise in every frame: no flicker
    erased = out[:, 0, 0] != 1
    assert len({m.numpy().tobytes() for m in erased}) > 1  # boxes differ between clips
    assert not torch.equal(out[0, 0, 0][erased[0]], out[1, 0, 0][erased[0]])  # and so does their noise
