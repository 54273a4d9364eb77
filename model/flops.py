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

    The forward runs in eval mode with autograd on (see below), on random input: a model whose
    inference path depends on the content is counted on the path it takes then (A-ViT: its masked
    path, every token through every block, the upper bound of its zipped inference).
    """
    in_chans = in_chans or getattr(model, "in_chans", 3)
    param = next(model.parameters())
    shape = (batch_size, in_chans, resolution, resolution)
    if is_video_model(model):
        shape = (batch_size, in_chans, num_frames or getattr(model, "num_frames", 8), resolution, resolution)
    x = torch.randn(shape, device=param.device, dtype=param.dtype)
    was_training = model.training
    # the unfused ops: the same maths, with the mixing GEMMs as their own op (the fused op counts both);
    # on every SparseFormer inside (a wrapper such as FrameAveraged holds one)
    fused = {m: m.fused_sample_mix for m in model.modules() if hasattr(m, "fused_sample_mix")}
    model.eval()
    try:
        for m in fused:
            m.fused_sample_mix = False
        # (no torch.no_grad: FlopCounterMode's module tracker rejects parameters passed as block inputs under it)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for m, value in fused.items():
            m.fused_sample_mix = value
    by_op = {str(op): flops / 2 / batch_size for op, flops in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops() / 2 / batch_size
    mixing = by_op.get(str(torch.ops.sparseformer.adaptive_mix), 0.0)
    return {"macs": total, "macs_without_mixing": total - mixing, "mixing_macs": mixing, "by_op": by_op}


def main() -> None:
    """`python -m model.flops`: parameters and counted GMACs of every registered model at 224 px
    (a video model per clip of 8 frames; a ViT built for 224 px), and SparseFormer-T against resolution."""
    from .factory import accepted_arguments, create_model, list_models, model_class

    print(f"{'model':<28}{'params':>14}{'GMACs w/o mixing':>18}{'mixing GMACs':>14}")
    for name in list_models():
        accepted = accepted_arguments(model_class(name))
        sized = {k: v for k, v in (("img_size", 224), ("num_frames", 8)) if k in accepted}
        m = create_model(name, **sized)
        c = count_flops(m, 224, num_frames=8)
        n = sum(p.numel() for p in m.parameters())
        print(f"{name:<28}{n:>14,}{c['macs_without_mixing'] / 1e9:>18.3f}{c['mixing_macs'] / 1e9:>14.3f}")
    m = create_model("sparseformer_t")
    print("\nsparseformer_t GMACs (without mixing) against resolution")
    for resolution in (160, 224, 288, 384, 512, 1024):
        print(f"{resolution:>6}: {count_flops(m, resolution)['macs_without_mixing'] / 1e9:.3f}")


if __name__ == "__main__":
    main()
