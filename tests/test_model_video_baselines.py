"""Video baselines: the dense joint space-time ViViT and the frame-order-blind frame-averaged model."""
from __future__ import annotations

import inspect

import pytest
import torch

from data.moving_digits import MovingDigits
from model.deit import Block, DeiT
from model.framewise import VARIANTS as FRAMEWISE_VARIANTS
from model.framewise import FrameAveraged
from model.vivit import VARIANTS, ViViT

TINY_SPARSEFORMER = dict(num_tokens=4, num_points=4, conv_dim=8, focusing_dim=16, cortex_dim=32, cortex_depth=1,
                         num_heads=4, focusing_repeats=1, backend="torch")  # fmt: skip


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_vivit_small_is_deit_small_with_tubelets():
    from model.deit import VARIANTS as DEIT_VARIANTS

    small = VARIANTS["vivit_small"]
    assert {k: small[k] for k in ("embed_dim", "depth", "num_heads")} == {
        k: DEIT_VARIANTS["deit_small"][k] for k in ("embed_dim", "depth", "num_heads")}
    # built 2 blocks deep to stay fast: the blocks are DeiT's, the difference is the embedding alone
    m = ViViT(**{**small, "depth": 2}, num_classes=1000)
    deit = DeiT(embed_dim=384, depth=2, num_heads=6, num_classes=1000)
    # the second tubelet frame of the embedding (3·16·16·384) and 8·14·14 - 14·14 more position rows (·384)
    assert n_params(m) - n_params(deit) == 3 * 16 * 16 * 384 + (8 * 196 - 196) * 384
    assert all(type(b) is Block for b in m.blocks)
    assert m.patch_embed.kernel_size == (2, 16, 16) and m.pos_embed.shape == (1, 1569, 384)
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    assert inspect.signature(ViViT).parameters["num_classes"].default == 400  # Kinetics-400


def test_vivit_nano_forward_backward_and_attends_over_time():
    m = ViViT(**{**VARIANTS["vivit_nano"], "num_classes": 8})
    x = torch.randn(2, 1, 8, 64, 64, requires_grad=True)
    logits = m(x)
    assert logits.shape == (2, 8) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert x.grad.abs().sum() > 0 and m.pos_embed.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():  # joint space-time attention: frame order matters
        assert not torch.allclose(m(x), m(x.flip(2)), atol=1e-5)


@pytest.mark.parametrize("shape, match", [
    ((2, 1, 64, 64), "clips"), ((2, 1, 4, 64, 64), "1, 8, 64, 64"), ((2, 3, 8, 64, 64), "in_chans"),
])  # fmt: skip
def test_vivit_rejects_wrong_clips(shape, match):
    m = ViViT(**VARIANTS["vivit_nano"])
    with pytest.raises(ValueError, match=match):
        m(torch.zeros(shape))
    with pytest.raises(ValueError, match="floating-point"):
        m(torch.zeros(1, 1, 8, 64, 64, dtype=torch.uint8))


def test_half_input_to_fp32_weights_is_one_error_naming_both_dtypes():
    """(PyTorch's own: "Input type (c10::Half) and bias type (float) should be the same")"""
    for m, x in ((ViViT(**VARIANTS["vivit_nano"]), torch.zeros(1, 1, 8, 64, 64)),
                 (DeiT(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2), torch.zeros(1, 3, 32, 32))):
        with pytest.raises(ValueError, match=r"weights are torch.float32 but the .* are torch.float16; convert"):
            m(x.half())
        with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the ops cast it
            m(x.half())


@pytest.mark.parametrize("shape, match", [
    ((1, 1, 0, 64, 64), "clips with no frames"),
    ((1, 4, 1, 64, 64), r"built for 1 input channels, got clips of shape \(1, 4, 1, 64, 64\): clips are "
                        r"\(B, C, T, H, W\); a \(B, T, C, H, W\) batch needs x.transpose\(1, 2\)"),
])
@pytest.mark.parametrize("name", ["videosparseformer_nano", "framewise_sparseformer_nano"])
def test_clip_models_name_an_empty_or_transposed_clip(name, shape, match):
    from model import create_model

    m = create_model(name, in_chans=1, **({} if name.startswith("framewise") else TINY_SPARSEFORMER))
    with pytest.raises(ValueError, match=match):
        m(torch.zeros(shape))


def test_vivit_refuses_frames_not_divisible_by_the_tubelet():
    with pytest.raises(ValueError, match="num_frames=7 must be a positive multiple of tubelet_size=2"):
        ViViT(num_frames=7)


def test_frame_averaging_is_blind_to_frame_order():
    m = FrameAveraged(FRAMEWISE_VARIANTS["framewise_sparseformer_nano"]["image_model"], num_classes=8, in_chans=1,
                      image_kwargs=TINY_SPARSEFORMER).eval()
    x = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        logits = m(x)
        per_frame = torch.stack([m.image_model(x[:, :, t]) for t in range(3)], 1).mean(1)
        torch.testing.assert_close(logits, per_frame)
        for perm in (torch.tensor([2, 1, 0]), torch.tensor([1, 2, 0])):
            torch.testing.assert_close(m(x[:, :, perm]), logits, rtol=1e-5, atol=1e-6)
        # on moving digits, a clip and its time reversal (class k vs k + 4) get the same logits
        ds, rev = MovingDigits("test", canvas_size=48, speed=(2, 2)), MovingDigits("test", canvas_size=48,
                                                                                      speed=(2, 2), reverse=True)
        (a, ya), (b, yb) = ds[(0, 0)], rev[(0, 0)]
        torch.testing.assert_close(m(a[None, :, :3].float())[0], m(b[None, :, -3:].float())[0], rtol=1e-5, atol=1e-6)
        assert ya != yb
    assert m.no_weight_decay() == {"image_model.token_roi"} and m.num_classes == 8 and m.in_chans == 1


def test_frame_averaging_takes_a_module_and_refuses_mixed_arguments():
    inner = DeiT(img_size=16, patch_size=8, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2)
    m = FrameAveraged(inner)
    assert m(torch.randn(2, 1, 4, 16, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="only when image_model is a name"):
        FrameAveraged(inner, num_classes=5)
    with pytest.raises(ValueError, match=r"clips \(B, C, T, H, W\)"):
        m(torch.randn(2, 1, 16, 16))


def test_frame_averaging_takes_its_image_models_weights_or_its_own(tmp_path):
    """pretrained= an image model's weights loads them into the per-frame model; its own (a framewise
    run's, keys under image_model.) load as they are; weights of another size name the mismatch."""
    from model import create_model

    image = create_model("sparseformer_nano", num_classes=8, in_chans=1, **TINY_SPARSEFORMER)
    torch.save(image.state_dict(), tmp_path / "image.pt")
    kw = dict(num_classes=8, in_chans=1, image_kwargs=TINY_SPARSEFORMER)
    m = create_model("framewise_sparseformer_nano", pretrained=str(tmp_path / "image.pt"), **kw)
    for (k, a), b in zip(image.state_dict().items(), m.image_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with torch.no_grad():
        m.image_model.token_roi.add_(0.01)  # now its own weights differ from the image file
    torch.save(m.state_dict(), tmp_path / "own.pt")
    again = create_model("framewise_sparseformer_nano", pretrained=str(tmp_path / "own.pt"), **kw)
    assert torch.equal(again.image_model.token_roi, m.image_model.token_roi)
    with pytest.raises(ValueError, match=r"shape mismatches .*token_embedding \(4, 16\) -> \(9, 16\)"):
        create_model("framewise_sparseformer_nano", pretrained=str(tmp_path / "image.pt"), num_classes=8, in_chans=1,
                     image_kwargs={**TINY_SPARSEFORMER, "num_tokens": 9})
