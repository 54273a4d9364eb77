"""Training checkpoints: a `TrainState` with symmetric `save` / `restore`, written atomically (a temp
file in the same folder, then os.replace), so a run killed mid-write keeps its previous checkpoint.

The layout of `<run_dir>/checkpoints/last.pt`, the one place it is written down: a dict of tensors
and plain Python values only, so `torch.load(path, weights_only=True)` reads it.

| key | value |
|---|---|
| `model` | `model.state_dict()` (the bare model, no DDP `module.` prefix) |
| `ema` | `{"module": state dict, "updates": int}`, or None without EMA |
| `optimizer` | `optimizer.state_dict()` |
| `scaler` | `GradScaler.state_dict()` (`{}` when the scaler is off: fp32, bf16) |
| `schedule` | the lr schedule (`training.optim.lr_at`): base_lr, total_steps, warmup_steps, warmup_lr, min_lr |
| `step` | optimizer steps done |
| `epoch`, `batch_in_epoch` | the sampler position: the epoch, and the batches of it already consumed |
| `rng` | per rank: `{"torch": uint8 tensor, "cuda": [uint8 tensor per GPU], "numpy": {...}, "python": [...]}` |
| `wandb_id` | the W&B run id, so a resumed run logs into the same run |
| `config` | the run's resolved config, a plain dict |
| `cpu_seconds` | CPU seconds of the training processes so far, over all ranks (for `trainer.cpu_budget_s`) |
| `evaluated_epoch` | `epoch` at the last evaluation (an epoch-end checkpoint precedes its evaluation) |

`model.create_model(name, pretrained="<run>/checkpoints/last.pt")` takes its `model` weights.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from model.hub import read_checkpoint

from . import dist
from .optim import EMA

LAST = "last.pt"


def save_atomic(obj, path: Path, save=torch.save) -> None:
    """save(obj, temp file) next to `path`, flushed to the disk, then renamed onto `path` (the rename
    flushed too): a kill, crash or power loss leaves the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        save(obj, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill signal turned exception: no partial file of a model's size left behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk; a filesystem that cannot sync a folder
    (some network ones) is let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def all_finite(module: nn.Module) -> bool:
    """Every floating-point parameter and buffer of `module` is finite (one host sync)."""
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.dtype.is_floating_point]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def find_last(run_dir: Path) -> Path | None:
    path = Path(run_dir) / "checkpoints" / LAST
    return path if path.is_file() else None


def load(path: Path) -> dict:
    """A checkpoint of ours (the layout above): tensors and plain values, loaded weights-only."""
    return read_checkpoint(path)  # one line naming the file for a damaged or foreign one


def rng_state() -> dict:
    """This process's torch / CUDA / numpy / python RNG states, as tensors, lists and numbers."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU visible when it was saved; a resume may see fewer (another machine,
        # CUDA_VISIBLE_DEVICES) or more: each device that has a saved state gets it back
        for index, device_state in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


@dataclass
class TrainState:
    """Everything a run needs to continue exactly. Parts a caller does not hold (an evaluation has
    no optimizer) are None, and `restore` skips them."""

    model: nn.Module
    ema: EMA | None = None
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    schedule: dict = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    wandb_id: str | None = None
    config: dict = field(default_factory=dict)
    cpu_seconds: float = 0.0  # CPU seconds of the training processes so far, over all ranks (trainer.cpu_budget_s)
    evaluated_epoch: int = 0  # `epoch` at the last evaluation
    restored_ema: bool = field(default=False, compare=False)  # the last load_state_dict found an EMA in the file

    def state_dict(self, rng: list[dict]) -> dict:
        """The checkpoint (layout above), with `rng` the RNG state of every rank."""
        return {
            "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scaler": self.scaler.state_dict() if self.scaler else None, "schedule": dict(self.schedule),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "rng": rng,
            "wandb_id": self.wandb_id, "config": self.config, "cpu_seconds": self.cpu_seconds,
            "evaluated_epoch": self.evaluated_epoch,
        }

    def load_state_dict(self, ckpt: dict, rank: int = 0) -> None:
        """The inverse of `state_dict`: this rank's RNG state (a rank the run did not have keeps its own
        seeding: copying another rank's stream would repeat that rank's augmentation draws)."""
        self.model.load_state_dict(ckpt["model"])
        self.restored_ema = self.ema is not None and ckpt.get("ema") is not None
        if self.restored_ema:
            self.ema.load_state_dict(ckpt["ema"])
        elif self.ema is not None:  # a file from a run without EMA: start the average at its weights
            self.ema = EMA(self.model, self.ema.decay)
        if self.optimizer is not None:  # its moments from the file, its settings from this run's config
            settings = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
                        for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(ckpt["optimizer"])
            for group, own in zip(self.optimizer.param_groups, settings, strict=True):
                group.update(own)
        if self.scaler is not None and ckpt.get("scaler"):  # {} from a run without fp16: keep the fresh scale
            self.scaler.load_state_dict(ckpt["scaler"])
        self.schedule = dict(ckpt.get("schedule") or self.schedule)
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.wandb_id, self.config = ckpt.get("wandb_id"), ckpt.get("config") or self.config
        self.cpu_seconds = float(ckpt.get("cpu_seconds", 0.0))
        self.evaluated_epoch = int(ckpt.get("evaluated_epoch", self.epoch))  # (older files: taken as evaluated)
        rng = ckpt.get("rng")
        if rng and rank < len(rng):  # a rank the run did not have keeps the stream it was seeded with
            set_rng_state(rng[rank])

    def save(self, path: Path, info: dist.DistInfo) -> None:
        """Collective: every rank's RNG state is gathered, rank 0 writes `path` atomically. Weights that
        are not finite on any rank are never written (FloatingPointError on every rank), so a diverged
        run keeps its last good checkpoint."""
        bad = torch.tensor([0.0 if all_finite(self.model) else 1.0], device=info.device)
        if dist.all_reduce_sum(bad, info).item():  # every rank raises, or none (a rank's own BN buffers may differ)
            raise FloatingPointError(f"the model's weights are not finite at step {self.step}: not saved, "
                                     f"{path} keeps the last good checkpoint (lower the lr, or use bf16 / fp32)")
        rng = dist.all_gather_object(rng_state(), info)
        if info.is_main:
            save_atomic(self.state_dict(rng), path)
        dist.barrier(info)

    def restore(self, path: Path, info: dist.DistInfo | None = None) -> None:
        """Every rank reads `path` and takes its own RNG state."""
        self.load_state_dict(load(path), info.rank if info else 0)
