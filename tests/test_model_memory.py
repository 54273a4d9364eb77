"""The model's memory options (fused sample+mix, stem recompute, cortex checkpointing): the same
numbers, less activation memory (saved-tensor bytes counted by autograd)."""
import pytest
import torch

import model
from model.memory import saved_bytes_per_sample, saved_tensor_bytes

TINY = dict(num_tokens=4, num_points=9, conv_dim=8, focusing_dim=16, cortex_dim=32, cortex_depth=3, num_heads=4,
            num_classes=5)


def grads_of(m, x, seed=0):
    torch.manual_seed(seed)  # the same drop-path masks for every variant compared
    m.zero_grad(set_to_none=True)
    out = m(x, return_aux=True)
    (out.logits.square().sum() + out.embedding.sum()).backward()
    return [out.logits.detach()] + [p.grad.clone() for p in m.parameters()]


def assert_same(a, b, rtol=1e-5):
    for u, v in zip(a, b, strict=True):
        assert ((u - v).norm() / v.norm().clamp_min(1e-12)).item() <= rtol


@pytest.mark.parametrize("option", [dict(recompute_stem=True), dict(checkpoint_cortex=True),
                                    dict(fused_sample_mix=True), dict(recompute_stem=True, checkpoint_cortex=True,
                                                                      fused_sample_mix=True)],
                         ids=["recompute_stem", "checkpoint_cortex", "fused", "all"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_options_change_memory_not_numbers(option, in_chans):
    """Every option gives the plain model's logits and gradients (drop path on: the recomputed
    cortex blocks must replay the same masks); the 1-channel case takes the stem's GEMM path."""
    kw = dict(TINY, in_chans=in_chans, drop_path_rate=0.3, backend="torch")
    torch.manual_seed(1)
    plain = model.create_model("sparseformer_nano", **kw, fused_sample_mix=False, recompute_stem=False)
    other = model.create_model("sparseformer_nano", **kw, **{"fused_sample_mix": False, "recompute_stem": False,
                                                              **option})
    other.load_state_dict(plain.state_dict())
    x = torch.randn(3, in_chans, 32, 32)
    assert_same(grads_of(other, x), grads_of(plain, x))


def test_deterministic_recompute_touches_no_rng_state(monkeypatch):
    """The stem (and cortex blocks without stochastic depth) recompute without saving or restoring any
    RNG state: CUDA's generator refuses to be read during a CUDA-graph capture, so only regions that
    draw random numbers may read it (grads_of above checks that those replay their masks)."""
    m = model.create_model("sparseformer_nano", **TINY, backend="torch", recompute_stem=True, checkpoint_cortex=True)

    def refuse(*args, **kwargs):
        raise AssertionError("RNG state read or written")

    for name in ("get_rng_state", "set_rng_state"):
        monkeypatch.setattr(torch, name, refuse)
    monkeypatch.setattr(torch.random, "fork_rng", refuse)
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in m.stem.parameters())


def test_triton_path_fuses_by_default(monkeypatch):
    """fused_sample_mix="auto": the 5 sampling steps run the fused op on the Triton backend only."""
    import kernels.fused as fused_mod

    calls, real = [], fused_mod._sample_mix_op
    monkeypatch.setattr(fused_mod, "_sample_mix_op", lambda *args: calls.append(args[-1]) or real(*args))
    x = torch.randn(2, 3, 32, 32)
    model.create_model("sparseformer_nano", **TINY, backend="torch")(x)
    assert calls == []
    m = model.create_model("sparseformer_nano", **TINY, backend="triton")
    assert m.fused_sample_mix == "auto" and m.recompute_stem == "auto"
    m(x)
    assert calls == ["triton"] * 5  # 4 focusing repeats + cortex block 1


def test_activation_memory_target_for_sparseformer_t():
    """SparseFormer-T at 224 px in fp32 (the Triton path's defaults: fused sample+mix, the stem
    recomputed) keeps <= 30 MiB per image for backward; the unfused eager path keeps ~39 MiB."""
    x = torch.randn(1, 3, 224, 224)
    mib = {}
    for name, kw in {"eager": dict(fused_sample_mix=False, recompute_stem=False),
                     "fused": dict(fused_sample_mix=True, recompute_stem=False),
                     "fused+stem": dict(fused_sample_mix=True, recompute_stem=True),
                     "fused+stem+cortex": dict(fused_sample_mix=True, recompute_stem=True, checkpoint_cortex=True)
                     }.items():
        m = model.create_model("sparseformer_t", backend="torch", **kw).train()
        mib[name] = saved_tensor_bytes(m, x) / 2**20
    assert mib["eager"] > mib["fused"] > mib["fused+stem"] > mib["fused+stem+cortex"]
    assert mib["fused+stem"] <= 30.0, mib
    assert 35 <= mib["eager"] <= 45, mib


@pytest.mark.parametrize("kw, match", [(dict(fused_sample_mix="yes"), "fused_sample_mix"),
                                       (dict(recompute_stem=1), "recompute_stem"),
                                       (dict(checkpoint_cortex="auto"), "checkpoint_cortex")])
def test_bad_option_values(kw, match):
    with pytest.raises(ValueError, match=match):
        model.create_model("sparseformer_nano", **TINY, **kw)


def test_per_image_bytes_leave_out_what_the_batch_does_not_scale():
    """Under bf16 autocast the weights' bf16 copies are saved for backward once per batch: the per-image
    figure is the slope from batch 1, the same at batch 2 and 4 (S(B) / B was not: ~2x apart here)."""
    m = model.create_model("sparseformer_nano", **TINY, backend="torch").train()
    for dtype in (None, torch.bfloat16):
        two, four = (saved_bytes_per_sample(m, torch.randn(b, 3, 32, 32), dtype) for b in (2, 4))
        assert two == pytest.approx(four, rel=0.02), dtype
    whole = saved_tensor_bytes(m, torch.randn(2, 3, 32, 32), torch.bfloat16) / 2
    assert whole > 1.3 * saved_bytes_per_sample(m, torch.randn(2, 3, 32, 32), torch.bfloat16)
