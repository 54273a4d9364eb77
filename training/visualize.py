"""Drawing each token's RoI and sampling points over the input image, per sampling step."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def to_display(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised (C, H, W) -> (H, W) or (H, W, 3) floats in [0, 1] for imshow."""
    x = x.detach().float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def draw_sampling(images: torch.Tensor, rois: list[torch.Tensor], points: list[torch.Tensor] | None, mean, std,
                  steps: list[int] | None = None, titles: list[str] | None = None, cell: float = 2.4):
    """One row per image, one column per sampling step: each token's RoI (a box, one colour per
    token) and its sampling points. images (B, C, H, W) normalised; rois[s] (B, N, 4) as
    (x1, y1, x2, y2) in [0, 1]; points[s] (B, N, P, 2) as (x, y) in [0, 1]. Returns the Figure."""
    steps = list(range(len(rois))) if steps is None else steps
    B, N = rois[0].shape[:2]
    colors = plt.cm.hsv(np.linspace(0, 1, N, endpoint=False))
    fig, axes = plt.subplots(B, len(steps), figsize=(cell * len(steps), cell * B), squeeze=False)
    for b in range(B):
        img = to_display(images[b], mean, std)
        h, w = img.shape[:2]
        for col, s in enumerate(steps):
            ax = axes[b, col]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, w, h, 0))
            box = rois[s][b].detach().float().cpu().numpy()
            for n in range(N):
                x1, y1, x2, y2 = box[n]
                ax.add_patch(Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h, fill=False,
                                       edgecolor=colors[n], linewidth=0.8))
                if points is not None:
                    p = points[s][b, n].detach().float().cpu().numpy()
                    ax.scatter(p[:, 0] * w, p[:, 1] * h, s=1.5, color=colors[n], linewidths=0)
            ax.set_xlim(-0.1 * w, 1.1 * w)
            ax.set_ylim(1.1 * h, -0.1 * h)
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(f"sampling step {s + 1}", fontsize=8)
            if col == 0 and titles:
                ax.set_ylabel(titles[b], fontsize=8)
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Rendered RGB (H, W, 3) uint8, then the figure is closed."""
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr


def draw_tubes(clip: torch.Tensor, rois: list[torch.Tensor], points: list[torch.Tensor] | None, mean, std,
               steps: list[int] | None = None, max_frames: int = 8, title: str | None = None, cell: float = 2.0):
    """One clip, one row per sampling step, one column per frame: each token's tube where it covers
    that frame (a box, one colour per token) and the sampling points that fall in that frame.

    clip (C, T, H, W) normalised; rois[s] (N, 6) as (x1, y1, t1, x2, y2, t2) and points[s] (N, P, 3)
    as (x, y, t), all in [0, 1] (one clip's entries of VideoSparseFormer's aux output). Frame f covers
    t in [f / T, (f + 1) / T). Returns the Figure."""
    steps = list(range(len(rois))) if steps is None else steps
    T = clip.shape[1]
    frames = list(range(T)) if T <= max_frames else np.linspace(0, T - 1, max_frames).round().astype(int).tolist()
    N = rois[0].shape[0]
    colors = plt.cm.hsv(np.linspace(0, 1, N, endpoint=False))
    fig, axes = plt.subplots(len(steps), len(frames), figsize=(cell * len(frames), cell * len(steps)), squeeze=False)
    for row, s in enumerate(steps):
        tube = rois[s].detach().float().cpu().numpy()
        pts = None if points is None else points[s].detach().float().cpu().numpy()
        for col, f in enumerate(frames):
            ax = axes[row, col]
            img = to_display(clip[:, f], mean, std)
            h, w = img.shape[:2]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, w, h, 0))
            lo, hi = f / T, (f + 1) / T
            for n in range(N):
                x1, y1, t1, x2, y2, t2 = tube[n]
                a, b = min(t1, t2), max(t1, t2)  # covers [a, b]: overlaps the frame's [lo, hi) inside it
                if (a < hi and b > lo) or (a == b and lo <= a < hi):
                    ax.add_patch(Rectangle((x1 * w, y1 * h), (x2 - x1) * w, (y2 - y1) * h, fill=False,
                                           edgecolor=colors[n], linewidth=0.8))
                if pts is not None:
                    here = (pts[n, :, 2] >= lo) & (pts[n, :, 2] < hi)
                    ax.scatter(pts[n, here, 0] * w, pts[n, here, 1] * h, s=1.5, color=colors[n], linewidths=0)
            ax.set_xlim(-0.1 * w, 1.1 * w)
            ax.set_ylim(1.1 * h, -0.1 * h)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"frame {f}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"sampling step {s + 1}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
