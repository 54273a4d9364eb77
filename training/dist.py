"""torch.distributed in a few lines: torchrun (single or multi-node rendezvous) and Slurm through
submitit set the environment; a plain `python train.py` runs as a world of one."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _slurm_env() -> None:
    """Under Hydra's submitit launcher each Slurm task is a process: export torchrun's variables."""
    if "RANK" in os.environ or "SLURM_JOB_ID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import submitit

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of this process: its local rank among the visible GPUs, or the only one it sees (a
    scheduler that gives each task its own GPU, e.g. Slurm's --gpus-per-task=1, hides the others)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} but only {visible} CUDA devices are visible to this process: "
                           "start at most one process per visible GPU (torchrun --nproc_per_node)")
    return local_rank


def setup(device: str, backend: str) -> DistInfo:
    _slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("hardware.device=cuda but CUDA is not available; use hardware=cpu")
        dev = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1:
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them only at the
    start of a training forward, so after a step each rank holds statistics updated by its own batch;
    evaluated as they are, each rank's share of the test set would be scored by another model than
    the one rank 0 saves."""
    if info.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
