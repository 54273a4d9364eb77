"""VideoSparseFormer: from-scratch initialisation, inflation from image weights (a static clip gives
the image model's logits), backends, FLOPs, inputs."""
import pytest
import torch

import model
from model.sparseformer import make_sampling_points
from model.video import VideoSparseFormer, inflate, tubes_from_boxes

TINY = dict(num_tokens=4, num_points=8, conv_dim=8, focusing_dim=16, cortex_dim=32, cortex_depth=2, num_heads=4,
            num_classes=5, backend="torch")


def test_from_scratch_initialisation_works():
    """Grid tubes (replicate r spans [r/R, (r+1)/R]), distinct token embeddings, zero RoI-adjust
    weights, and temporal offsets with a spread: the sampled points of a token cover its tube in
    time, and the offsets' gradient is O(1), not the ~1/(3 eps) of equal t offsets."""
    m = model.create_model("videosparseformer_nano", **{**TINY, "replicates": 3})
    rois = m.token_roi.detach()
    assert rois.shape == (12, 6)
    assert (rois[:, 3:] > rois[:, :3]).all(), "every tube has positive extent"
    torch.testing.assert_close(rois[:, 2], torch.tensor([0.0] * 4 + [1 / 3] * 4 + [2 / 3] * 4))
    torch.testing.assert_close(rois[:, 5] - rois[:, 2], torch.full((12,), 1 / 3))
    torch.testing.assert_close(rois[4:8, [0, 1, 3, 4]], m.token_roi[:4, [0, 1, 3, 4]].detach())  # same grid
    emb = m.token_embedding.detach()
    assert torch.cdist(emb, emb).add(torch.eye(12) * 1e9).min() > 1.0, "token embeddings are distinct"
    for block in (m.focusing, m.cortex[0]):
        assert block.roi_adjust_module[1].weight.shape == (6, 16 if block is m.focusing else 32)
        assert (block.roi_adjust_module[1].weight == 0).all()
        t_bias = block.roi_offset_bias.view(8, 3)[:, 2]
        assert t_bias.std() > 0.2, "temporal offsets start spread"
    offsets = m.focusing.roi_offset_bias.detach().view(1, 1, 8, 3).expand(1, 12, 8, 3).clone().requires_grad_(True)
    points = make_sampling_points(rois[None], offsets)
    t = points[0, :, :, 2]
    assert ((t >= rois[:, 2:3]) & (t <= rois[:, 5:6])).all() and (t.max(1).values - t.min(1).values > 0.1).all()
    (points * torch.randn_like(points)).sum().backward()
    assert 0 < offsets.grad.abs().max() < 10


def test_forward_shapes_and_aux():
    m = model.create_model("videosparseformer_nano", **TINY).eval()
    out = m(torch.randn(2, 1, 4, 32, 32), return_aux=True)
    assert out.logits.shape == (2, 5) and torch.isfinite(out.logits).all()
    R = m.replicates
    assert all(r.shape == (2, 4 * R, 6) for r in out.rois) and all(p.shape == (2, 4 * R, 8, 3) for p in out.points)
    assert m.point_grad_clamp(torch.zeros(1, 4, 8, 16, 8)) == [1 / 16, 1 / 8, 1 / 4]


def test_frame_order_matters():
    """Not a frame-averaging model: reversing the clip changes the logits."""
    m = model.create_model("videosparseformer_nano", **TINY).eval()
    x = torch.randn(2, 1, 4, 32, 32)
    assert not torch.allclose(m(x), m(x.flip(2)), atol=1e-4)


@pytest.mark.parametrize("replicates", [1, 4])
def test_inflated_model_on_a_static_clip_gives_the_image_logits(replicates):
    """Inflate an image SparseFormer (random non-trivial weights); on a clip whose frames all equal the
    image, every replicate computes the image model's tokens (duplicated keys leave attention
    unchanged), as long as the sampled times stay inside the clip: from 4R frames on (3R too few for
    R = 1, 2 and 4); at 2R frames the outermost points read zero padding beyond the first and last
    frame centres and the logits differ (docs/MODEL.md, "Inflation")."""
    torch.manual_seed(0)
    image = model.create_model("sparseformer_nano", **{**TINY, "num_points": 9, "in_chans": 3}).eval()
    with torch.no_grad():
        for p in image.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    video = inflate(image, replicates=replicates).eval()
    assert video.num_tokens == 4 * replicates and video.ndim == 3
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for frames in (32, 4 * replicates):
            clip = img[:, :, None].expand(-1, -1, frames, -1, -1)
            torch.testing.assert_close(video(clip), image(img), rtol=1e-4, atol=1e-5)
        short = video(img[:, :, None].expand(-1, -1, 2 * replicates, -1, -1))
        assert (short - image(img)).abs().max() > 1e-4
    # the temporal offsets are spread after inflation, as from scratch
    assert video.focusing.roi_offset_bias.view(9, 3)[:, 2].std() > 0.2
    # even P (every shipped variant): the two time levels split evenly and 3R frames already suffice
    image = model.create_model("sparseformer_nano", **{**TINY, "in_chans": 3}).eval()  # P = 8
    video = inflate(image, replicates=replicates).eval()
    with torch.no_grad():
        torch.testing.assert_close(video(img[:, :, None].expand(-1, -1, 3 * replicates, -1, -1)), image(img),
                                   rtol=1e-4, atol=1e-5)


def test_inflation_keeps_the_image_models_dtype_and_device():
    """The video model is made where the image model lives, in its dtype (an fp64 model stays fp64;
    the meta device stands in for a GPU: a tensor made on the CPU would not join it)."""
    image = model.create_model("sparseformer_nano", **TINY).double().eval()
    video = inflate(image, replicates=2)
    assert {p.dtype for p in video.parameters()} == {torch.float64}
    img = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(video(img[:, :, None].expand(-1, -1, 8, -1, -1)), image(img))
    with torch.device("meta"):
        on_meta = model.create_model("sparseformer_nano", **TINY)
    assert {p.device.type for p in inflate(on_meta, replicates=2).parameters()} == {"meta"}


def test_inflating_the_authors_weights(fixtures_dir):
    """The authors' released v1 layout (fixture) -> our image model -> a video model that reproduces the
    authors' logits on a static clip."""
    ref = torch.load(fixtures_dir / "official_v1_small.pt", weights_only=True)
    image = model.load_official_checkpoint(ref["state_dict"], ref["config"], backend="torch").eval()
    video = inflate(image, replicates=2).eval()
    clip = ref["input"][:, :, None].expand(-1, -1, 64, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(video(clip), ref["logits"], rtol=1e-4, atol=1e-4)


def test_triton_backend_matches_torch_backend():
    m = model.create_model("videosparseformer_nano", **TINY)
    x = torch.randn(2, 1, 4, 24, 24)
    results = {}
    for backend in ("torch", "triton"):
        m.backend = backend
        m.zero_grad()
        out = m(x)
        out.square().sum().backward()
        results[backend] = [out.detach()] + [p.grad.clone() for p in m.parameters()]
    for a, b in zip(results["triton"], results["torch"], strict=True):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() <= 1e-4


def test_flops_count_over_frames():
    m = model.create_model("videosparseformer_t")
    c8, c16 = model.count_flops(m, 224, num_frames=8), model.count_flops(m, 224, num_frames=16)
    assert c16["macs"] > c8["macs"] and c8["mixing_macs"] == c16["mixing_macs"] > 0  # tokens do not grow with T
    # 196 tokens: 4x SparseFormer-T's token work, plus the stem on 8 frames
    assert c8["macs_without_mixing"] / 1e9 == pytest.approx(8 * 0.18 + 4 * 1.89, rel=0.25)


def test_tubes_from_boxes_and_bad_inputs():
    boxes = torch.tensor([[0.0, 0.1, 0.5, 0.6]])
    torch.testing.assert_close(tubes_from_boxes(boxes, 2), torch.tensor([[0.0, 0.1, 0.0, 0.5, 0.6, 0.5],
                                                                         [0.0, 0.1, 0.5, 0.5, 0.6, 1.0]]))
    m = model.create_model("videosparseformer_nano", **TINY)
    with pytest.raises(ValueError, match=r"expects clips \(B, 1, T, H, W\)"):
        m(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(2, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="replicates"):
        VideoSparseFormer(replicates=0)


def test_pretrained_video_model_inflates_its_image_variants_weights(tmp_path):
    """create_model("videosparseformer_*", pretrained=<image weights>) = inflate(the image model with them)."""
    image = model.create_model("sparseformer_nano", **{**TINY, "in_chans": 1})
    path = tmp_path / "image.pt"
    torch.save(image.state_dict(), path)
    video = model.create_model("videosparseformer_nano", pretrained=str(path), **{**TINY, "in_chans": 1},
                               replicates=3)
    expected = inflate(image, replicates=3)
    for (k, a), b in zip(video.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_inflate_refuses_what_it_cannot_inflate():
    image = model.create_model("sparseformer_nano", **TINY)
    with pytest.raises(TypeError, match="inflate takes an image SparseFormer .* got VideoSparseFormer"):
        inflate(inflate(image, replicates=2))
    with pytest.raises(TypeError, match="got DeiT"):
        inflate(model.create_model("deit_tiny"))
    with pytest.raises(ValueError, match=r"\['num_points', 'num_tokens'\] would change the weights' shapes"):
        inflate(image, num_tokens=9, num_points=16)
    assert inflate(image, replicates=2, drop_path_rate=0.1).drop_path_rates[-1] == pytest.approx(0.1)


def test_image_weights_of_other_sizes_say_which_size_to_give(tmp_path):
    path = tmp_path / "image.pt"
    torch.save(model.create_model("sparseformer_nano", **{**TINY, "num_tokens": 9}).state_dict(), path)
    with pytest.raises(ValueError, match=r"token_embedding \(9, .*\n\(videosparseformer_nano inflates "
                                         r"sparseformer_nano weights .* 4 spatial tokens x 2 replicates: give it the "
                                         r"image weights' sizes"):
        model.create_model("videosparseformer_nano", pretrained=str(path), **TINY, replicates=2)


def test_a_video_models_own_weights_load_as_they_are(tmp_path):
    """pretrained=<a VideoSparseFormer checkpoint> (a Kinetics run's last.pt, to fine-tune on another
    video set) loads its tube weights directly (not through the image variant, whose 4-wide RoIs would
    not take them); another class count re-initialises only the classifier."""
    torch.manual_seed(0)
    trained = model.create_model("videosparseformer_nano", **{**TINY, "in_chans": 1}, replicates=3)
    path = tmp_path / "last.pt"
    torch.save({"model": trained.state_dict(), "step": 1}, path)
    same = model.create_model("videosparseformer_nano", pretrained=str(path), **{**TINY, "in_chans": 1},
                              replicates=3)
    for (k, a), b in zip(same.state_dict().items(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    other = model.create_model("videosparseformer_nano", pretrained=str(path),
                               **{**TINY, "in_chans": 1, "num_classes": 7}, replicates=3)
    head = {k for k, v in other.state_dict().items() if v.shape != trained.state_dict()[k].shape}
    assert head == {"head.classifier.weight", "head.classifier.bias"}, head
    kept = [k for k in trained.state_dict() if k not in head]
    assert all(torch.equal(other.state_dict()[k], trained.state_dict()[k]) for k in kept)
