"""Input checks the models share: one clear error instead of PyTorch's raw dtype mismatch or an
IndexError from inside a layer."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def check_dtype(model: nn.Module, x: Tensor, what: str = "images") -> None:
    """Floating-point input in the weights' dtype, or under autocast (where the ops cast it)."""
    name = type(model).__name__
    if not x.is_floating_point():
        raise ValueError(f"{name} expects floating-point {what}, got {x.dtype}; convert with x.float()")
    weight_dtype = next(model.parameters()).dtype
    autocast_on = torch.is_autocast_enabled(x.device.type) if x.device.type in ("cuda", "cpu") else False
    if x.dtype != weight_dtype and not autocast_on:  # else PyTorch's raw "Input type (c10::Half) and bias type"
        raise ValueError(f"{name}'s weights are {weight_dtype} but the {what} are {x.dtype}; convert with "
                         f"x.to({weight_dtype}), the model with model.to({x.dtype}), or run under torch.autocast")


def check_clip_layout(model: nn.Module, x: Tensor, in_chans: int) -> None:
    """A 5-D batch is (B, C, T, H, W) with C = in_chans and at least one frame."""
    name = type(model).__name__
    if x.shape[1] != in_chans:
        hint = "; a (B, T, C, H, W) batch needs x.transpose(1, 2)" if x.shape[2] == in_chans else ""
        raise ValueError(f"{name} was built for {in_chans} input channels, got clips of shape {tuple(x.shape)}: "
                         f"clips are (B, C, T, H, W){hint}")
    if x.shape[2] == 0:
        raise ValueError(f"{name} got clips with no frames, shape {tuple(x.shape)}")
