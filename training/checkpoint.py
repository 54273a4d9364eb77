"""Checkpoints written atomically (temp file in the same folder, then os.replace), so a run
killed mid-write leaves the previous checkpoint intact."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

LAST = "last.pt"


def save_atomic(obj: dict, path: Path, save=torch.save) -> None:
    """save(obj, temp file) next to `path`, then rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    save(obj, tmp)
    os.replace(tmp, path)


def find_last(run_dir: Path) -> Path | None:
    path = Path(run_dir) / "checkpoints" / LAST
    return path if path.is_file() else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load(path: Path) -> dict:
    # our checkpoints hold numpy / python RNG states and the config: not weights-only
    return torch.load(path, map_location="cpu", weights_only=False)
