"""SparseFormer model: variants, inputs, geometry, initialisation, FLOPs (issue: model)."""
import math
from pathlib import Path

import pytest
import torch

import model
from model.sparseformer import EarlyConvolution, SparseFormer, _GemmGradStemConv, adjust_rois, make_sampling_points

EXACT_PARAMS = {
    "sparseformer_t": 31_522_212,
    "sparseformer_s": 47_575_056,
    "sparseformer_b": 81_076_996,
    "deit_tiny": 5_717_416,
    "deit_small": 22_050_664,
}
TINY = dict(num_tokens=4, num_points=4, conv_dim=8, focusing_dim=16, cortex_dim=32, cortex_depth=2, num_heads=4,
            num_classes=5, backend="torch")  # fmt: skip


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_parameter_counts(name):
    assert n_params(model.create_model(name, num_classes=1000)) == EXACT_PARAMS[name]


def test_registry_lists_every_variant_and_rejects_unknown_names():
    names = model.list_models()
    expected = {"sparseformer_t", "sparseformer_s", "sparseformer_b", "sparseformer_nano", "deit_tiny", "deit_small"}
    assert expected <= set(names)
    with pytest.raises(ValueError, match="known models: .*sparseformer_t"):
        model.create_model("sparseformer_xl")
    with pytest.raises(ValueError, match="unknown override.*num_tokenz"):
        model.create_model("sparseformer_t", num_tokenz=3)


def test_overrides_change_the_architecture():
    m = model.create_model("sparseformer_nano", **TINY, in_chans=1, drop_path_rate=0.1)
    assert m.token_embedding.shape == (4, 16) and m.token_roi.shape == (4, 4)
    assert m.stem.conv1.weight.shape == (8, 1, 7, 7)
    assert len(m.cortex) == 2 and m.head.classifier.out_features == 5
    assert m.cortex[0].attn.num_heads == 4
    assert m.drop_path_rates == pytest.approx(torch.linspace(0, 0.1, 6).tolist())


def test_forward_returns_logits_and_aux():
    m = model.create_model("sparseformer_nano", **TINY).eval()
    x = torch.randn(3, 3, 32, 40)
    logits = m(x)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    out = m(x, return_aux=True)
    torch.testing.assert_close(out.logits, logits)
    assert out.embedding.shape == (3, 4, 32)
    assert len(out.rois) == len(out.points) == 5  # 4 focusing repeats + cortex block 1
    assert all(r.shape == (3, 4, 4) for r in out.rois)
    assert all(p.shape == (3, 4, 4, 2) for p in out.points)


def test_float64_and_backward_run():
    m = model.create_model("sparseformer_nano", **TINY).double()
    x = torch.randn(2, 3, 24, 24, dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(3, 32, 32), r"expects images \(B, 3, H, W\)"),
        (torch.randn(1, 1, 32, 32), "built for 3 input channels, got 1"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating-point"),
        (torch.randn(1, 3, 4, 32), "at least 8x8"),
        (torch.randn(1, 3, 32, 32, dtype=torch.float64), r"weights are torch.float32 but the images are torch.float64"),
        (torch.randn(1, 3, 32, 32).half(), r"images are torch.float16; convert with x.to\(torch.float32\)"),
        (torch.randn(1, 3, 32, 32).bfloat16(), "images are torch.bfloat16"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, match):
    m = model.create_model("sparseformer_nano", **TINY)
    with pytest.raises(ValueError, match=match):
        m(x)


def test_bf16_input_runs_under_autocast():
    m = model.create_model("sparseformer_nano", **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(m(torch.randn(1, 3, 24, 24).bfloat16()).float()).all()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_tokens=0), "num_tokens must be a positive integer"),
        (dict(focusing_dim=30, num_heads=4), "divisible by num_heads"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(num_points=1), "num_points must be >= 2"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        model.create_model("sparseformer_nano", **{**TINY, **overrides})


def test_deit_rejects_wrong_resolution():
    m = model.create_model("deit_tiny", img_size=64, depth=1)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(ValueError, match="img_size"):
        m(torch.randn(1, 3, 32, 32))


def test_initial_rois_and_offset_grid_follow_the_spec():
    m = SparseFormer(num_tokens=10, num_points=9, conv_dim=8, focusing_dim=16, cortex_dim=16, cortex_depth=1,
                     num_heads=4)
    # root = 3: token k at x-index k // 3, y-index k % 3, half-size boxes; token 9 covers the image.
    k = 5
    ux, uy = (k // 3) / 2, (k % 3) / 2
    torch.testing.assert_close(m.token_roi[k], torch.tensor([0.5 * ux, 0.5 * uy, 0.5 * ux + 0.5, 0.5 * uy + 0.5]))
    torch.testing.assert_close(m.token_roi[9], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    bias = m.focusing.roi_offset_bias.view(9, 2)
    torch.testing.assert_close(bias[1], torch.tensor([1.5 / 3 - 0.5, 0.5 / 3 - 0.5]))  # x varies fastest
    assert torch.all(m.focusing.roi_adjust_module[1].weight == 0)
    assert torch.all(m.cortex[0].adaptive_mixing.parameter_generator[2].weight == 0)
    assert m.focusing.roi_offset_module[1].weight.std() > 0.005  # offset Linear keeps its std-0.02 init
    torch.testing.assert_close(m.focusing.roi_adjust_module[0].weight, torch.full((16,), 0.25))
    assert m.no_weight_decay() == {"token_roi"}


def test_roi_adjust_and_points_geometry():
    rois = torch.tensor([[[0.2, 0.2, 0.6, 0.4]]])
    delta = torch.tensor([[[0.5, -1.0, math.log(2.0), 0.0]]])
    # centre (0.4, 0.3) + (0.5*0.4, -1*0.2) = (0.6, 0.1); size (0.8, 0.2)
    torch.testing.assert_close(adjust_rois(rois, delta), torch.tensor([[[0.2, 0.0, 1.0, 0.2]]]))
    offsets = torch.tensor([-1.0, 1.0]).view(1, 1, 2, 1).expand(1, 1, 2, 2)
    points = make_sampling_points(rois, offsets)
    # standardised offsets are +-1 / (3 * sqrt(2) + 3e-7); scaled by the box size (0.4, 0.2)
    half = 1.0 / (3 * (math.sqrt(2.0) + 1e-7))
    expected = torch.tensor([[0.4 - half * 0.4, 0.3 - half * 0.2], [0.4 + half * 0.4, 0.3 + half * 0.2]])
    torch.testing.assert_close(points[0, 0], expected)


@pytest.mark.parametrize("hw", [(9, 10), (16, 16), (13, 7)])
def test_gemm_grad_stem_conv_gradcheck(hw):
    """The 1-channel CPU training stem: fp64 gradcheck of its GEMM weight/bias gradients, odd and even sizes."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, *hw, dtype=torch.float64)
    w = torch.randn(3, 1, 7, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = _GemmGradStemConv.apply(x, w, b)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, b, stride=2, padding=3))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda w, b: _GemmGradStemConv.apply(x, w, b), (w, b))


def test_stem_takes_the_gemm_path_only_where_it_is_exact():
    """Training a 1-channel stem goes through the GEMM weight gradient and matches the plain conv's
    gradients; an input that needs its own gradient (saliency) keeps the plain conv."""
    torch.manual_seed(0)
    stem = EarlyConvolution(in_chans=1, conv_dim=8)
    x = torch.rand(3, 1, 20, 22)
    assert stem.gemm_weight_grad(x)
    assert not stem.gemm_weight_grad(x.clone().requires_grad_())
    assert not EarlyConvolution(in_chans=3, conv_dim=8).gemm_weight_grad(torch.rand(1, 3, 20, 22))
    with torch.no_grad():
        assert not stem.gemm_weight_grad(x)
    g = torch.randn(3, 5, 6, 8)
    fast = torch.autograd.grad(stem(x), (stem.conv1.weight, stem.conv1.bias), g)
    xg = x.clone().requires_grad_()  # plain-conv path
    plain = torch.autograd.grad(stem(xg), (stem.conv1.weight, stem.conv1.bias), g)
    for a, b, p in zip(fast, plain, (stem.conv1.weight, stem.conv1.bias), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # exactly the parameter's strides, as DDP's gradient buckets compare them (a (32, 1, 7, 7)
        # gradient with strides (49, 1, 7, 1) is "contiguous" but warns "Grad strides do not match")
        assert a.stride() == p.stride()


def test_drop_path_is_per_sample_and_off_in_eval():
    m = model.create_model("sparseformer_nano", **{**TINY, "drop_path_rate": 0.9})
    x = torch.randn(1, 3, 24, 24).expand(16, -1, -1, -1)
    m.train()
    out = m(x)
    assert not torch.allclose(out[0], out[1:]), "per-sample masks must give different outputs for equal inputs"
    m.eval()
    out = m(x)
    torch.testing.assert_close(out, out[:1].expand_as(out))


def test_sampling_grad_scale_scales_the_point_gradient_clamp():
    m = model.create_model("sparseformer_nano", **TINY)
    x = torch.randn(2, 3, 32, 32)
    grads = {}
    for scale in (1e-6, 1.0):
        m.zero_grad()
        m.sampling_grad_scale = scale
        m(x).square().sum().backward()
        grads[scale] = m.token_roi.grad.clone()
    assert grads[1e-6].abs().max() < grads[1.0].abs().max()


@pytest.mark.parametrize(
    "name, expected, mixing",
    [("sparseformer_t", 2.07, 0.11), ("sparseformer_s", 3.86, 0.15), ("sparseformer_b", 7.82, 0.19)],
)
def test_flops_match_the_paper(name, expected, mixing):
    counted = model.count_flops(model.create_model(name), 224)
    assert counted["macs_without_mixing"] / 1e9 == pytest.approx(expected, rel=0.02)
    assert counted["mixing_macs"] / 1e9 == pytest.approx(mixing, rel=0.05)
    assert counted["macs"] == pytest.approx(counted["macs_without_mixing"] + counted["mixing_macs"])


def test_flops_resolution_table_for_t():
    m = model.create_model("sparseformer_t")
    table = {160: 1.99, 224: 2.07, 288: 2.19, 384: 2.42, 512: 2.82}
    for resolution, expected in table.items():
        assert model.count_flops(m, resolution)["macs_without_mixing"] / 1e9 == pytest.approx(expected, rel=0.02)


def test_flops_of_dense_baseline():
    counted = model.count_flops(model.create_model("deit_small"), 224)
    assert counted["macs"] / 1e9 == pytest.approx(4.6, rel=0.02) and counted["mixing_macs"] == 0


def test_triton_backend_matches_torch_backend_end_to_end():
    """The whole model through the Triton kernels (interpreter on CPU) against the references."""
    m = model.create_model("sparseformer_nano", **TINY)
    x = torch.randn(2, 3, 24, 24)
    results = {}
    for backend in ("torch", "triton"):
        m.backend = backend
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = m(xi, return_aux=True)
        (out.logits.square().sum() + out.embedding.sum()).backward()
        results[backend] = (out.logits.detach(), xi.grad, {k: p.grad.clone() for k, p in m.named_parameters()})
    (ref_logits, ref_xgrad, ref_grads), (logits, xgrad, grads) = results["torch"], results["triton"]
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xgrad, ref_xgrad, rtol=1e-4, atol=1e-7)
    for k, g in ref_grads.items():
        assert ((grads[k] - g).norm() / g.norm().clamp_min(1e-12)).item() <= 1e-4, k


def test_python_m_model_flops_has_no_runpy_warning():
    """`import model` must not import model.flops, or `python -m model.flops` warns (runpy)."""
    import subprocess
    import sys

    code = "import sys, model; assert 'model.flops' not in sys.modules; model.count_flops"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1], timeout=120)


def test_flops_count_the_mixing_apart_inside_a_wrapper_too():
    """FrameAveraged holds a SparseFormer: the count switches it to the unfused ops as well (the fused
    op lumps the mixing GEMMs in with sampling), and puts its setting back."""
    inner = {"fused_sample_mix": True, "backend": "torch"}
    framewise = model.create_model("framewise_sparseformer_nano", image_kwargs=inner)
    image = model.create_model("sparseformer_nano", **inner)
    got, want = model.count_flops(framewise, 64, num_frames=2), model.count_flops(image, 64)
    assert want["mixing_macs"] > 0
    # per clip: the image model's count on each of the 2 frames
    assert got["mixing_macs"] == pytest.approx(2 * want["mixing_macs"])
    assert got["macs"] == pytest.approx(2 * want["macs"])
    assert framewise.image_model.fused_sample_mix is True
