"""Multiply-accumulates counted from the real ops with `torch.utils.flop_counter.FlopCounterMode`.

Our custom ops (`sparseformer::adaptive_mix`, `sparseformer::sparse_sample`) carry FLOP formulas
(kernels/), so the dynamic-mixing GEMMs are counted like any matmul and can be reported apart:
papers of this field quote MACs (fvcore's convention) and leave the mixing bmm out.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

import kernels  # noqa: F401  (registers the custom ops and their FLOP formulas)

# The CPU SDPA kernel has no formula in FlopCounterMode; count it like the CUDA ones.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def is_video_model(model: nn.Module) -> bool:
    """Video models take clips (B, C, T, H, W) and say so: `takes_clips = True` (VideoSparseFormer,
    ViViT, FrameAveraged)."""
    return getattr(model, "takes_clips", False)


def count_flops(model: nn.Module, resolution: int, in_chans: int | None = None, batch_size: int = 1,
                num_frames: int | None = None) -> dict:
    """Count one forward pass at `resolution` x `resolution` (video models: on `num_frames` frames,
    default the model's own num_frames or 8).

    Returns MACs per image (per clip): `macs` (everything counted), `macs_without_mixing` (the
    paper's convention), `mixing_macs`, and `by_op` (MACs per op name).
    """
    in_chans = in_chans or getattr(model, "in_chans", 3)
    param = next(model.parameters())
    shape = (batch_size, in_chans, resolution, resolution)
    if is_video_model(model):
        shape = (batch_size, in_chans, num_frames or getattr(model, "num_frames", 8), resolution, resolution)
    x = torch.randn(shape, device=param.device, dtype=param.dtype)
    was_training = model.training
    # the unfused ops: the same maths, with the mixing GEMMs as their own op (the fused op counts both)
    fused = getattr(model, "fused_sample_mix", None)
    model.eval()
    try:
        if fused is not None:
            model.fused_sample_mix = False
        # (no torch.no_grad: FlopCounterMode's module tracker rejects parameters passed as block inputs under it)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        if fused is not None:
            model.fused_sample_mix = fused
    by_op = {str(op): flops / 2 / batch_size for op, flops in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops() / 2 / batch_size
    mixing = by_op.get(str(torch.ops.sparseformer.adaptive_mix), 0.0)
    return {"macs": total, "macs_without_mixing": total - mixing, "mixing_macs": mixing, "by_op": by_op}


def main() -> None:
    """`python -m model.flops`: parameters and counted GMACs of every registered model at 224,
    and SparseFormer-T against resolution."""
    from .factory import create_model, list_models

    print(f"{'model':<20}{'params':>14}{'GMACs w/o mixing':>18}{'mixing GMACs':>14}")
    for name in list_models():
        m = create_model(name)
        c = count_flops(m, 224)
        n = sum(p.numel() for p in m.parameters())
        print(f"{name:<20}{n:>14,}{c['macs_without_mixing'] / 1e9:>18.3f}{c['mixing_macs'] / 1e9:>14.3f}")
    m = create_model("sparseformer_t")
    print("\nsparseformer_t GMACs (without mixing) against resolution")
    for resolution in (160, 224, 288, 384, 512, 1024):
        print(f"{resolution:>6}: {count_flops(m, resolution)['macs_without_mixing'] / 1e9:.3f}")


if __name__ == "__main__":
    main()
