"""SparseFormer v1 (T/S/B and a CPU-sized nano), VideoSparseFormer (inflate: image -> video), DeiT and
ViViT baselines, the authors' checkpoint converter
(v1 and v2 layouts), released weights through the torch hub cache (hub.py) and a FLOP counter.
`create_model(name, pretrained=False, **overrides)` is the way in."""
from .factory import create_model, list_models
from .sparseformer import (
    SparseFormer,
    SparseFormerOutput,
    convert_official_state_dict,
    export_official_state_dict,
    load_official_checkpoint,
)
from .video import VideoSparseFormer, inflate


def count_flops(*args, **kwargs):
    """model.flops.count_flops (imported on first use, so `python -m model.flops` runs without runpy's
    'found in sys.modules' warning)."""
    from .flops import count_flops as count

    return count(*args, **kwargs)

__all__ = [
    "create_model",
    "list_models",
    "count_flops",
    "SparseFormer",
    "SparseFormerOutput",
    "convert_official_state_dict",
    "export_official_state_dict",
    "load_official_checkpoint",
    "VideoSparseFormer",
    "inflate",
]
