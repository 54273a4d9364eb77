"""Activation memory counted from autograd itself: the bytes of the tensors a forward pass saves
for backward, per image (the number that limits the batch size when training)."""
from __future__ import annotations

import torch
import torch.nn as nn


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes saved for backward by `model(x)` in the model's current mode, counted with autograd's
    saved-tensor hooks: each storage once (views and re-saves of one tensor count once), the
    model's parameters left out. Deterministic: independent of the allocator and the device.
    Regions recomputed in backward save what their recomputation needs (their inputs)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    autocast = torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x)
    return sum(storages.values())
