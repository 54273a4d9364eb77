"""On a CUDA GPU (`pytest -m gpu`): the device-side augmentation of the ImageNet and Kinetics recipes
never makes the host wait for the GPU. A host sync per batch stalls the input pipeline: the CPU
stops queueing kernels until the GPU drains. RandAugment and random erasing draw their parameters on
the CPU and copy them to the device without waiting (kornia 0.9's samplers, used until 2026-12-08,
moved to the device with the module and copied each draw back: a blocking copy).
`torch.cuda.set_sync_debug_mode("error")` turns any sync (a `.item()`, a device-to-host copy, a
data-dependent branch) into an error naming the op.
No CPU variant: on the CPU nothing is asynchronous (the CPU suite runs both recipes in
tests/test_data_video_augment.py and tests/test_train.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

# the GPU window's tests step runs this beside the kernel tests, on a python that may lack the
# training stack: then this module skips instead of breaking the collection
OmegaConf = pytest.importorskip("omegaconf").OmegaConf
CONF = Path(__file__).resolve().parents[1] / "conf"
CUDA = [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else []


def recipe(data: str) -> dict:
    aug = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{data}.yaml").augment)
    return dict(randaugment=aug["randaugment"], random_erasing=aug["random_erasing"], mixup=aug["mixup"],
                label_smoothing=aug["label_smoothing"])


@pytest.mark.parametrize("device", CUDA)
@pytest.mark.parametrize("data", ["imagenet", "kinetics"])
def test_train_augmentation_does_not_sync_the_host(device, data):
    from data.augment import BatchTransform
    from data.video_augment import VideoBatchTransform

    video = data == "kinetics"
    transform = (VideoBatchTransform if video else BatchTransform)(
        [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 1000, train=True, **recipe(data)).to(device)
    shape = (8, 3, 4, 64, 64) if video else (32, 3, 96, 96)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    y = torch.randint(0, 1000, (shape[0],), device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):  # several draws: RandAugment's ops, erasing and Mixup/CutMix branches vary
            out, target = transform(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == x.shape and target.shape == (shape[0], 1000)
    assert torch.isfinite(out).all()
