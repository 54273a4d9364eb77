"""Drawing a VideoSparseFormer's tubes over the frames of a clip."""
import numpy as np
import torch

import model
from training.visualize import draw_tubes, figure_to_array


def test_draw_tubes_over_frames():
    m = model.create_model("videosparseformer_nano", num_tokens=4, num_points=4, conv_dim=8, focusing_dim=16,
                           cortex_dim=32, cortex_depth=1, num_heads=4, num_classes=8, backend="torch").eval()
    clip = torch.rand(1, 1, 6, 32, 32)
    with torch.no_grad():
        out = m(clip, return_aux=True)
    fig = draw_tubes(clip[0], [r[0] for r in out.rois], [p[0] for p in out.points], [0.0], [1.0], steps=[0, 4],
                     title="label 3")
    assert len(fig.axes) == 2 * 6
    # replicate 0 spans [0, 1/2] of the clip, replicate 1 [1/2, 1]: every frame shows one replicate's
    # 4 boxes (frame 3, [1/2, 2/3), not replicate 0's too, which only touches it at 1/2)
    assert [len(ax.patches) for ax in fig.axes[:6]] == [4] * 6
    img = figure_to_array(fig)
    assert img.ndim == 3 and np.asarray(img).std() > 10
