"""How a checkpoint reaches the disk: atomic and flushed (training.checkpoint.save_atomic), and never
with weights that are not finite on any rank (TrainState.save, all ranks agreeing)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from training import checkpoint, dist


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1}, path)

    def dies_half_way(obj, tmp):
        Path(tmp).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_atomic({"step": 2}, path, save=dies_half_way)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_the_file_is_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without the first fsync a power loss can leave `last.pt` renamed but empty; without the second,
    the rename itself may be lost."""
    events = []
    real_replace = os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1}, path)
    tmp_name = f".last.pt.tmp.{os.getpid()}"
    assert events == [("fsync", str(tmp_path / tmp_name)), ("replace", str(path)), ("fsync", str(tmp_path))]


def _save_on_two_ranks(rank: int, store: str, out: str, bad_rank: int | None) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = torch.nn.Linear(3, 2)
        if rank == bad_rank:
            with torch.no_grad():
                model.bias[1] = float("nan")
        state = checkpoint.TrainState(model, step=7)
        try:
            state.save(Path(out) / "last.pt", dist.DistInfo(rank=rank, world_size=2))
            result = "saved"
        except FloatingPointError as e:
            result = f"refused: {e}"
        (Path(out) / f"rank{rank}.txt").write_text(result)
    finally:
        tdist.destroy_process_group()


@pytest.mark.parametrize("bad_rank", [None, 1])
def test_no_rank_saves_weights_that_are_not_finite_on_any_rank(tmp_path, bad_rank):
    """Rank 0 writes; a NaN on rank 1 alone must stop it too, and every rank must learn of it (a rank
    that went on would wait for the others at its next collective)."""
    mp.start_processes(_save_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path), bad_rank), nprocs=2,
                       start_method="spawn")
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if bad_rank is None:
        assert results == ["saved", "saved"]
        ckpt = checkpoint.load(tmp_path / "last.pt")
        assert ckpt["step"] == 7 and len(ckpt["rng"]) == 2  # both ranks' RNG states
    else:
        assert all(r.startswith("refused: the model's weights are not finite at step 7") for r in results), results
        assert not (tmp_path / "last.pt").exists()


def _buffers_on_two_ranks(rank: int, store: str, out: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        bn = torch.nn.BatchNorm1d(3)
        bn(torch.randn(8, 3) + rank)  # each rank's own batch: other running statistics
        dist.broadcast_buffers(bn, dist.DistInfo(rank=rank, world_size=2))
        torch.save(bn.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_evaluation_buffers_are_rank_zeros(tmp_path):
    """BatchNorm statistics after a step differ per rank (DDP syncs them only when a training forward
    starts): before evaluating, every rank takes rank 0's, the ones its checkpoint holds."""
    mp.start_processes(_buffers_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert a["running_mean"].abs().sum() > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cuda_rng_states_restore_onto_fewer_or_more_gpus(monkeypatch):
    """A checkpoint saved with 2 GPUs visible, resumed where 1 is (or 3 are): each device with a saved
    state gets it back (set_rng_state_all raised IndexError on fewer)."""
    state = checkpoint.rng_state()
    state["cuda"] = [torch.tensor([i], dtype=torch.uint8) for i in range(2)]
    for visible in (1, 3):
        restored = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda v=visible: v)
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i, out=restored: out.append((int(s[0]), i)))
        checkpoint.set_rng_state(state)
        assert restored == [(i, i) for i in range(min(2, visible))]
