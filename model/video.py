"""VideoSparseFormer: SparseFormer on clips (the paper's video model; docs/MODEL.md, "Video").

The same model with three changes, all in this file, everything else (blocks, adaptive mixing,
attention, head, the fused kernels) shared with model/sparseformer.py:
- the image stem runs on every frame (the authors' Conv3d (1, 7, 7) / MaxPool3d (1, 3, 3) is
  exactly that): clips (B, C, T, H, W) -> a channels-last volume (B, T, H/4, W/4, C);
- RoIs are tubes (x1, y1, t1, x2, y2, t2), adjusted by 6 deltas, with 3-D sampling points
  (x, y, t) sampled trilinearly (SamplingBlock with ndim = 3);
- tokens are inflated by `replicates` R: replicate r holds the image model's grid of boxes with the
  temporal span [r / R, (r + 1) / R]; token index r * N + n (replicate-major, as the authors).

Built from scratch it is initialised to work (the authors' video model is not: its tube table is a
default nn.Embedding, many tubes inverted, its offset bias randn): grid tubes, distinct token
embeddings, zero RoI-adjust weights, and a spread of the temporal offsets (model.sparseformer.
offset_bias_init). `inflate` turns any image SparseFormer (ours, or the authors' released weights
through load_official_checkpoint) into a video model.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .inputs import check_clip_layout
from .sparseformer import EarlyConvolution, SparseFormer, offset_bias_init


class FramewiseStem(EarlyConvolution):
    """The image stem on every frame: clips (B, C, T, H, W) -> (B, T, H/4, W/4, C) channels-last,
    contiguous. Same parameters as the image stem (`stem.conv1.*`), so image weights load as they are."""

    def forward(self, x: Tensor) -> Tensor:
        B, C, T, H, W = x.shape
        frames = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))  # (B*T, h, w, C)
        return frames.view(B, T, *frames.shape[1:])


class VideoSparseFormer(SparseFormer):
    """Clips (B, in_chans, T, H, W) -> logits. num_tokens is the spatial grid per replicate: the model
    has num_tokens * replicates latent tokens. Other arguments as SparseFormer."""

    ndim = 3
    takes_clips = True

    def __init__(self, num_tokens: int = 49, replicates: int = 4, **kwargs):
        if not isinstance(replicates, int) or replicates < 1:
            raise ValueError(f"VideoSparseFormer: replicates must be a positive integer, got {replicates!r}")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"VideoSparseFormer: num_tokens must be a positive integer, got {num_tokens!r}")
        super().__init__(num_tokens=num_tokens * replicates, **kwargs)
        self.replicates, self.spatial_tokens = replicates, num_tokens
        self.init_kwargs.update(num_tokens=num_tokens, replicates=replicates)
        self.init_weights()  # again, now that the tubes know R

    @staticmethod
    def make_stem(in_chans: int, conv_dim: int) -> FramewiseStem:
        return FramewiseStem(in_chans, conv_dim)

    def initial_rois(self, n: int) -> Tensor:
        """(R * N, 6) tubes: replicate r of the image grid of boxes spans [r / R, (r + 1) / R] in time."""
        R = getattr(self, "replicates", 1)  # (the first init, inside SparseFormer.__init__, runs before R is set)
        return tubes_from_boxes(super().initial_rois(n // R), R)

    def point_grad_clamp(self, features: Tensor) -> list[float]:
        """The 2-D rule per axis: +-(1 / size of that axis) * scale for x, y, t (docs/MODEL.md, "Video")."""
        _, T, h, w, _ = features.shape
        s = self.sampling_grad_scale
        return [s / w, s / h, s / T]

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"VideoSparseFormer expects clips (B, {self.in_chans}, T, H, W), got {shape}")
        check_clip_layout(self, x, self.in_chans)
        super().check_input(x[:, :, 0])  # dtype and size, as for one frame


def tubes_from_boxes(boxes: Tensor, replicates: int) -> Tensor:
    """(N, 4) boxes (x1, y1, x2, y2) -> (R * N, 6) tubes (x1, y1, t1, x2, y2, t2), replicate-major,
    replicate r spanning [r / R, (r + 1) / R]."""
    R, N = replicates, boxes.shape[0]
    t1 = (torch.arange(R, dtype=boxes.dtype, device=boxes.device) / R).repeat_interleave(N)[:, None]
    b = boxes.repeat(R, 1)
    return torch.cat([b[:, :2], t1, b[:, 2:], t1 + 1.0 / R], dim=1)


@torch.no_grad()
def inflate(image_model: SparseFormer, replicates: int = 4, **overrides) -> VideoSparseFormer:
    """A VideoSparseFormer holding an image SparseFormer's weights (docs/MODEL.md, "Inflation"):
    the stem per frame (same weights), tokens and their boxes replicated R times with temporal
    spans [r / R, (r + 1) / R], zero rows for the new time deltas of the RoI adjustment and of the
    offset Linear, and the temporal offset bias spread (offset_bias_init): with all t offsets equal
    the standardisation would divide by ~0. On a static clip whose sampled times stay inside the
    clip, it computes the image model's logits (tests/test_model_video.py): from T = 4R frames on
    (16 for R = 4; 3R when P is even); on shorter clips the first and last replicates' outermost
    points fall outside the first and last frame centres and read some zero padding (the logits differ)."""
    if not isinstance(image_model, SparseFormer) or isinstance(image_model, VideoSparseFormer):
        raise TypeError("inflate takes an image SparseFormer (model.create_model('sparseformer_<t|s|b|nano>', ...) "
                        f"or model.load_official_checkpoint(...)), got {type(image_model).__name__}")
    shaped = sorted(set(overrides) & SHAPE_KEYS)
    if shaped:
        raise ValueError(f"inflate: {shaped} would change the weights' shapes, which come from the image model; "
                         "overrides are for settings such as backend or drop_path_rate")
    kwargs = {**image_model.init_kwargs, "num_tokens": image_model.num_tokens, **overrides}
    weight = next(image_model.parameters())  # the video model lives where the image model does, in its dtype
    video = VideoSparseFormer(replicates=replicates, **kwargs).to(weight.device, weight.dtype)
    state = image_model.state_dict()
    P = image_model.num_points
    for key in list(state):
        value = state[key]
        if key == "token_embedding":
            value = value.repeat(replicates, 1)
        elif key == "token_roi":
            value = tubes_from_boxes(value, replicates)
        elif key.endswith("roi_adjust_module.1.weight"):  # (dx, dy, dw, dh) -> (dx, dy, dt, dw, dh, dl)
            shift, scale = value.chunk(2, dim=0)
            zero = torch.zeros_like(shift[:1])
            value = torch.cat([shift, zero, scale, zero], dim=0)
        elif key.endswith("roi_offset_module.1.weight"):  # per point (x, y) -> (x, y, t)
            per_point = value.view(P, 2, -1)
            value = torch.cat([per_point, torch.zeros_like(per_point[:, :1])], dim=1).flatten(0, 1)
        elif key.endswith("roi_offset_bias"):
            t = offset_bias_init(P, 3)[:, 2:].to(value)
            value = torch.cat([value.view(P, 2), t], dim=1).flatten()
        state[key] = value
    video.load_state_dict(state)
    video.sampling_grad_scale = image_model.sampling_grad_scale
    return video


# Keys that set weight shapes: an inflated model takes the image model's.
SHAPE_KEYS = {"num_tokens", "num_points", "conv_dim", "focusing_dim", "cortex_dim", "cortex_depth", "mlp_ratio",
              "num_classes", "in_chans"}

# The image variant each video variant inflates for `create_model(name, pretrained=...)`.
IMAGE_VARIANTS = {"videosparseformer_t": "sparseformer_t", "videosparseformer_s": "sparseformer_s",
                  "videosparseformer_b": "sparseformer_b", "videosparseformer_nano": "sparseformer_nano"}

# The image variants' widths (model/sparseformer.py VARIANTS) with R = 4 replicates (the authors'
# example: 8 frames at 224 px, 196 tokens), and a CPU-sized one for the embedded moving-digits task.
VARIANTS: dict[str, dict] = {
    "videosparseformer_t": dict(num_tokens=49, replicates=4, focusing_dim=256, cortex_dim=512, cortex_depth=8,
                                drop_path_rate=0.2, num_classes=400),
    "videosparseformer_s": dict(num_tokens=64, replicates=4, focusing_dim=320, cortex_dim=640, cortex_depth=8,
                                drop_path_rate=0.3, num_classes=400),
    "videosparseformer_b": dict(num_tokens=81, replicates=4, focusing_dim=384, cortex_dim=768, cortex_depth=10,
                                drop_path_rate=0.4, num_classes=400),
    # Sized for 1x8x64x64 moving-digits clips on a 2-core CPU (docs/MODEL.md, "Video")
    "videosparseformer_nano": dict(
        num_tokens=16, replicates=2, num_points=16, conv_dim=32, focusing_dim=64, cortex_dim=128, cortex_depth=2,
        num_heads=8, drop_path_rate=0.0, in_chans=1, num_classes=8,
    ),
}  # fmt: skip
