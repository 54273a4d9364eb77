"""The token-reduction baselines against hand-computed cases: A-ViT's halting depths, remainders,
mean-field output and losses (model/avit.py); its token zipping at inference (same logits as the
masked forward, fewer tokens, less time); ToMe's merge step, size-weighted averages, proportional
attention and token counts (model/tome.py); the small CNN."""
import math
import time

import pytest
import torch
import torch.nn as nn

from model import create_model
from model.deit import Attention
from model.tome import bipartite_soft_matching, merge_wavg


def logit(p):
    return math.log(p / (1 - p))


class FixedBlock(nn.Module):
    """Ignores its input: channel 0 of token k is HALT[layer][k] (a logit), the other channels 10·layer + k."""

    def __init__(self, layer, logits):
        super().__init__()
        self.layer, self.logits = layer, logits

    def forward(self, x, attn_mask=None):
        out = (10 * self.layer + torch.arange(x.shape[1], dtype=x.dtype))[None, :, None].expand_as(x).clone()
        out[..., 0] = torch.tensor(self.logits, dtype=x.dtype)
        return out


# halting scores h per block (rows) and token (columns: class token, then two patches); the last block's
# scores are replaced by 1 (Eq. 3)
H = [[0.3, 0.995, 0.6], [0.5, 0.5, 0.45], [0.7, 0.7, 0.7]]


def toy_avit(target_depth=2.0):
    m = create_model("avit_tiny", img_size=4, patch_size=2, in_chans=1, num_classes=3, embed_dim=4, depth=3,
                     num_heads=1, drop_path_rate=0.0, gate_scale=1.0, gate_center=0.0, target_depth=target_depth)
    m.blocks = nn.ModuleList([FixedBlock(i + 1, [logit(p) for p in row]) for i, row in enumerate(H)])
    m.norm, m.head = nn.Identity(), nn.Identity()
    return m


def test_avit_halting_depths_remainders_and_losses_by_hand():
    m = toy_avit(target_depth=2.0).train()
    x = torch.zeros(1, 3, 4)  # class token + 2 patches (the FixedBlocks ignore their input)
    out = m.forward_masked(x)
    # class token: Σh = 0.3, 0.8, then 1.8 ≥ 0.99 at block 3: N = 3, R = 1 − 0.8 = 0.2, ρ = 3.2
    # patch 1: 0.995 ≥ 0.99 at block 1: N = 1, R = 1, ρ = 2
    # patch 2: 0.6, then 1.05 at block 2: N = 2, R = 0.4, ρ = 2.4
    assert m.last_depths.tolist() == [[3, 1, 2]]
    assert m.last_ponder.item() == pytest.approx((3.2 + 2 + 2.4) / 3)
    # mean field of the class token (Eq. 6): 0.3·t¹ + 0.5·t² + 0.2·t³, channels ≠ 0 are 10·layer
    assert out[0, 1:].tolist() == pytest.approx([0.3 * 10 + 0.5 * 20 + 0.2 * 30] * 3)
    # distributional prior: H = mean h per block over the tokens, normalised; prior N(2, 1) over depth 1..3
    means = [sum(H[0]) / 3, sum(H[1]) / 3, 1.0]
    h = [v / sum(means) for v in means]
    g = [math.exp(-0.5 * (d - 2.0) ** 2) for d in (1, 2, 3)]
    prior = [v / sum(g) for v in g]
    kl = sum(p * math.log(p / q) for p, q in zip(prior, h, strict=True))
    assert m.last_kl.item() == pytest.approx(kl, rel=1e-5)
    assert m.auxiliary_loss().item() == pytest.approx(5e-4 * 7.6 / 3 + 1e-3 * kl, rel=1e-5)


def test_avit_masked_training_masks_halted_tokens():
    """A halted token's input is zeroed and nobody attends to it: a later block sees it masked out."""
    m = toy_avit().train()
    seen = []
    m.blocks[1].forward = lambda x, attn_mask=None, b=m.blocks[1]: (seen.append((x.clone(), attn_mask)),
                                                                     FixedBlock.forward(b, x, attn_mask))[1]
    m.forward_masked(torch.ones(1, 3, 4))
    x, mask = seen[0]
    assert x[0, 1].abs().sum() == 0 and x[0, 0].abs().sum() > 0  # patch 1 halted at block 1
    # (query, key): no query attends to patch 1 but patch 1 itself (its output is never used)
    assert mask[0, 0].tolist() == [[True, False, True], [True, True, True], [True, False, True]]


def test_avit_gate_defaults_follow_the_released_scripts():
    tiny, small = create_model("avit_tiny"), create_model("avit_small")
    assert (tiny.gate_scale, tiny.gate_center, small.gate_center, tiny.eps) == (10.0, 30.0, 75.0, 0.01)
    assert (tiny.ponder_weight, tiny.distr_weight, tiny.target_depth) == (5e-4, 1e-3, 7.0)
    with pytest.raises(ValueError, match="target_depth"):
        create_model("avit_tiny", target_depth=13)


def halting_avit(**kw):
    torch.manual_seed(0)
    return create_model("avit_tiny", img_size=32, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=6,
                        num_heads=2, gate_scale=1.0, gate_center=0.5, **kw).eval()


@pytest.mark.parametrize("batch", [1, 4])
def test_avit_zipping_drops_tokens_with_the_masked_logits(batch):
    m = halting_avit()
    x = torch.randn(batch, 1, 32, 32)
    with torch.no_grad():
        zipped = m(x)  # eval + no grad: halted tokens removed
        kept = m.last_kept
        masked = m.forward_masked(m.embed(x))
    assert torch.allclose(zipped, masked, atol=1e-5)
    assert kept[0] == (batch, 65)
    assert kept[-1][1] < 65 or len(kept) < 6  # tokens (or whole samples) left before the last block
    assert [t for _, t in kept] == sorted([t for _, t in kept], reverse=True)


def test_avit_zipping_is_faster_when_tokens_halt():
    """Every token halts at block 1 (h = σ(50)): the zipped forward runs 1 block of 8 and is faster
    than the same weights as a DeiT (all 8 blocks)."""
    torch.manual_seed(0)
    kw = dict(img_size=64, patch_size=4, in_chans=1, num_classes=5, embed_dim=64, depth=8, num_heads=2)
    avit = create_model("avit_tiny", gate_scale=0.0, gate_center=-50.0, **kw).eval()
    deit = create_model("deit_tiny", **kw).eval()
    deit.load_state_dict(avit.state_dict())
    x = torch.randn(4, 1, 64, 64)

    def best(m):
        times = []
        with torch.inference_mode():
            for _ in range(5):
                t = time.perf_counter()
                m(x)
                times.append(time.perf_counter() - t)
        return min(times)

    assert best(avit) < 0.5 * best(deit)
    assert avit.last_kept == [(4, 257)]


def test_avit_trains_with_its_auxiliary_loss():
    m = halting_avit().train()
    loss = m(torch.randn(2, 1, 32, 32)).sum() + m.auxiliary_loss()
    loss.backward()
    assert m.blocks[0].mlp[0].weight.grad.abs().sum() > 0


def test_tome_merge_step_by_hand():
    # tokens 0..4: A = {0 (class), 2, 4}, B = {1, 3}; key 2 ≡ key 3 (cos 1), key 4 ~ key 1 (cos 0.8),
    # and the class token's key equals key 1 but is never merged
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.8, 0.6]])[None]
    x = torch.arange(5.0)[None, :, None]
    size = torch.ones(1, 5, 1)
    merged, msize = merge_wavg(bipartite_soft_matching(keys, 1), x, size)
    assert merged.flatten().tolist() == [0, 4, 1, 2.5] and msize.flatten().tolist() == [1, 1, 1, 2]
    merged, msize = merge_wavg(bipartite_soft_matching(keys, 2), x, size)
    assert merged.flatten().tolist() == [0, 2.5, 2.5] and msize.flatten().tolist() == [1, 2, 2]
    # at most half of the non-class tokens per block: r = 5 merges 2
    assert bipartite_soft_matching(keys, 5)(x).shape[1] == 3
    # size-weighted average: token 2 already stands for 3 patches
    size = torch.tensor([1.0, 1, 3, 1, 1])[None, :, None]
    merged, msize = merge_wavg(bipartite_soft_matching(keys, 1), x, size)
    assert merged.flatten().tolist() == [0, 4, 1, (2 * 3 + 3) / 4] and msize.flatten().tolist() == [1, 1, 1, 4]


def test_tome_proportional_attention_equals_duplicated_tokens():
    """A token of size 2 with log 2 added to its logits attends like two copies of it (Eq. 1)."""
    torch.manual_seed(0)
    attn = Attention(8, 2)
    a, b = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    dup = attn(torch.cat([a, b, b], 1))
    merged = attn(torch.cat([a, b], 1), torch.tensor([1.0, 2.0]).log()[None, None, None])
    assert torch.allclose(merged, dup[:, :2], atol=1e-6)


def test_tome_token_counts_and_off_the_shelf_weights():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, in_chans=1, num_classes=5, embed_dim=16, depth=5, num_heads=2)
    deit = create_model("deit_tiny", **kw).eval()
    tome = create_model("deit_tiny", tome_r=4, **kw).eval()
    tome.load_state_dict(deit.state_dict())  # tome_r is a setting, not a weight
    counts = []
    for block in tome.blocks:
        block.mlp.register_forward_hook(lambda mod, inp, out: counts.append(inp[0].shape[1]))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = tome(x)
    expected, t = [], 17  # 16 patches + class token; each block merges min(r, (t - 1) // 2)
    for _ in range(5):
        t -= min(4, (t - 1) // 2)
        expected.append(t)
    assert counts == expected == [13, 9, 5, 3, 2]
    assert out.shape == (3, 5) and not torch.allclose(out, deit(x))
    with pytest.raises(ValueError, match="tome_r"):
        create_model("deit_tiny", tome_r=-1)


def test_tome_r0_is_the_dense_deit():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, in_chans=1, num_classes=5, embed_dim=16, depth=2, num_heads=2)
    deit = create_model("deit_tiny", **kw).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        dense = deit(x)
        deit.tome_r = 1  # one merge per block already changes the logits
        assert not torch.allclose(deit(x), dense)


def test_small_cnn_shapes_and_errors():
    m = create_model("cnn_small", in_chans=1, num_classes=10)
    assert m(torch.randn(2, 1, 100, 100)).shape == (2, 10)
    with pytest.raises(ValueError, match="expects images"):
        m(torch.randn(2, 3, 100, 100))
