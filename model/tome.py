"""ToMe, token merging (Bolya et al., ICLR 2023, arXiv 2210.09461), for our DeiT (model/deit.py,
`create_model("deit_small", tome_r=13)`): in every block, after attention, r tokens are merged into
their most similar partner by bipartite soft matching on the head-averaged keys (Sec. 3, "Bipartite
soft matching"), as size-weighted averages, and the next attention adds log(size) to its logits
(proportional attention, Eq. 1). The class token is never merged; at most half the tokens per block."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def bipartite_soft_matching(keys: Tensor, r: int) -> Callable[[Tensor, str], Tensor]:
    """The merge of one block: keys (B, T, c), the class token at index 0 ->
    merge(x (B, T, d), reduce) -> (B, T - r', d), r' = min(r, (T - 1) // 2).

    Tokens alternate into sets A (even indices, the class token among them, never merged) and B (odd);
    each A token's best B partner is its highest cosine similarity; the r A tokens with the highest
    best-similarity are merged into their partners (scatter with `reduce`), the rest are kept. The
    output is [kept A tokens in their order (class token first), then all B tokens]."""
    B, T, _ = keys.shape
    r = min(r, (T - 1) // 2)  # the class token is protected; a block merges at most half of the others
    if r <= 0:
        return lambda x, reduce="sum": x
    with torch.no_grad():
        metric = keys / keys.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|) cosine similarity
        scores[:, 0] = -torch.inf  # the class token (A's first) is never a source
        best, partner = scores.max(dim=-1)  # (B, |A|)
        order = best.argsort(dim=-1, descending=True)[..., None]  # (B, |A|, 1)
        src_idx, kept_idx = order[:, :r], order[:, r:].sort(dim=1).values  # kept in original order
        dst_idx = partner[..., None].gather(1, src_idx)  # (B, r, 1)

    def merge(x: Tensor, reduce: str = "sum") -> Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        d = x.shape[-1]
        kept = a.gather(1, kept_idx.expand(-1, -1, d))
        src = a.gather(1, src_idx.expand(-1, -1, d))
        b = b.scatter_reduce(1, dst_idx.expand(-1, -1, d), src, reduce=reduce)
        return torch.cat([kept, b], dim=1)

    return merge


def merge_wavg(merge: Callable[[Tensor, str], Tensor], x: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge: x (B, T, d), size (B, T, 1) -> merged x, merged size (Sec. 3,
    "Tracking token size"): a merged token is the mean of the patches it stands for."""
    x = merge(x * size, "sum")
    size = merge(size, "sum")
    return x / size, size
