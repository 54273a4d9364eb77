"""torchrun + DistributedDataParallel on 2 CPU processes (gloo): replicas stay identical, one run
directory and one W&B run (rank 0), evaluation counts cover the whole set exactly once."""
from __future__ import annotations

import json

import torch

from train_helpers import FAST, TINY_MNIST, TINY_MODEL, run_train
from wandb_offline import find_run_files, read_run


def test_two_process_gloo_training_keeps_replicas_identical(tmp_path):
    res = run_train([*TINY_MODEL, *TINY_MNIST, *FAST, "data.test_samples=25", "+model.drop_path_rate=0.1",
                     "trainer.ckpt_every_steps=3"], cwd=tmp_path, torchrun=2, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs" / "torchrun").iterdir())  # named by the rendezvous id, shared
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["step"] == 4  # 32 samples / (2 ranks x 8) = 2 steps per epoch
    wandb_runs = find_run_files(run_dir)
    assert len(wandb_runs) == 1  # rank 0 only
    run = read_run(wandb_runs[0])
    assert run["summary"]["world_size"] == 2 and run["summary"]["global_batch_size"] == 16
    assert run["summary"]["ddp/replica_max_abs_diff"] == 0.0
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "val/top1" in line]
    assert evals and all(e["val/images"] == 25 for e in evals)  # 13 + 12 over the two ranks, no padding


def test_processes_option_relaunches_under_torchrun_in_one_run_dir(tmp_path):
    """`python train.py hardware.processes=2` (the cluttered-MNIST default) starts 2 single-threaded
    DDP ranks itself: one run folder (the parent's), both ranks in the checkpoint, result.json."""
    fast = [a for a in FAST if not a.startswith(("hardware.processes=", "hardware.num_threads="))]
    # OMP_NUM_THREADS unset, as in a user's shell: the launcher sets it for torchrun's children itself
    res = run_train([*TINY_MODEL, *TINY_MNIST, *fast, "hardware.processes=2"], cwd=tmp_path, timeout=400,
                    env_extra={"OMP_NUM_THREADS": None})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Setting OMP_NUM_THREADS" not in res.stderr + res.stdout  # torchrun's banner when it must choose
    assert "Grad strides do not match" not in res.stderr  # the 1-channel stem's weight gradient (DDP buckets)
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1 and run_dirs[0].parent.name != "torchrun", run_dirs
    run_dir = run_dirs[0]
    launch = next(line for line in (run_dir / "train.log").read_text().splitlines() if "launching" in line)
    assert "launching 2 local processes of 1 thread(s) each (torchrun --standalone --nproc_per_node=2 " in launch
    assert "import" not in launch  # the command as torchrun's CLI spells it, not the quiet wrapper's script
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["step"] == 4  # 32 samples / (2 ranks x 8) x 2 epochs
    result = json.loads((run_dir / "result.json").read_text())
    assert result["world_size"] == 2 and result["step"] == 4 and 0 <= result["top1"] <= 100
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    # resumed (finished: it evaluates again): the launcher writes the resume's config once, its ranks none
    res = run_train([*TINY_MODEL, *TINY_MNIST, *fast, "hardware.processes=2", f"run_dir={run_dir}",
                     "trainer.resume=auto"], cwd=tmp_path, timeout=400, env_extra={"OMP_NUM_THREADS": None})
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p.parent.name.startswith("resume-") for p in (run_dir / ".hydra").glob("*/config.yaml")] == [True]


def test_processes_must_be_positive(tmp_path):
    res = run_train([*TINY_MODEL, *TINY_MNIST, *FAST, "hardware.processes=0"], cwd=tmp_path, timeout=240)
    assert res.returncode != 0 and "hardware.processes=0" in res.stderr


def test_a_rank_whose_batch_is_all_undecodable_still_steps(tmp_path):
    """Half the training files are corrupt and each rank takes one file a step, so on some steps one rank
    has nothing to train on while the other has an image. It must still take the step (with zero weight):
    a rank that skipped it would pair its gradient all-reduce with the other's next step."""
    from PIL import Image

    root = tmp_path / "im"
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"n0{c}"
            d.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (200 * c, 80, 200 * (1 - c))).save(d / f"{i}.JPEG")
                if split == "train":
                    (d / f"bad{i}.JPEG").write_bytes(b"not a jpeg")
    res = run_train([*TINY_MODEL, *FAST, "data=imagenet", f"data.root={root}", "data.image_size=32",
                     "data.batch_size=1", "data.eval_batch_size=4", "data.num_workers=0", "data.augment.repeats=1",
                     "logger.num_roi_images=0", "trainer.epochs=1"], cwd=tmp_path, torchrun=2, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "torchrun").iterdir()
    log_text = (run_dir / "train.log").read_text()
    assert "undecodable training files: 8 reads skipped in the epoch with the most" in log_text, log_text[-2000:]
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 8  # 16 files / 2 ranks, one a step: every step taken on both ranks
    assert read_run(find_run_files(run_dir)[0])["summary"]["ddp/replica_max_abs_diff"] == 0.0


def test_each_process_takes_its_gpu_or_the_only_one_it_sees():
    """torchrun: local rank r takes GPU r; a scheduler that hides all but one GPU per task (Slurm
    --gpus-per-task=1) leaves each process cuda:0 whatever its local rank; more ranks than GPUs is a
    one-line error instead of CUDA's 'invalid device ordinal'."""
    import pytest

    from training.dist import cuda_index

    assert [cuda_index(r, 8) for r in (0, 3, 7)] == [0, 3, 7]
    assert cuda_index(3, 1) == 0
    with pytest.raises(RuntimeError, match="local rank 4 but only 2 CUDA devices"):
        cuda_index(4, 2)


def test_stand_in_batch_has_the_datasets_input_shape():
    """What a DDP rank whose very first batch was all undecodable steps on (zero weight): one black
    uint8 item the loaders' shape, (1, C, H, W) for images, (1, C, T, H, W) for clips."""
    import train as train_script
    from data.base import InputSpec

    x, y = train_script.stand_in_batch(InputSpec(num_classes=5, in_chans=3, image_size=32))
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.uint8 and y.tolist() == [0]
    x, _ = train_script.stand_in_batch(InputSpec(num_classes=5, in_chans=1, image_size=16, frames=8))
    assert x.shape == (1, 1, 8, 16, 16)


def test_a_rank_with_nothing_to_evaluate_does_not_stall_the_others(tmp_path):
    """One test item over 2 ranks: rank 1 runs no evaluation forward. Evaluating through the DDP
    wrapper, rank 0's first forward would broadcast the CNN's BatchNorm buffers (a collective rank 1
    never joins): the run must finish, with the one item counted."""
    fast = [a for a in FAST if not a.startswith("trainer.epochs")]
    res = run_train(["model=cnn_small", *TINY_MNIST, *fast, "data.test_samples=1", "trainer.epochs=1",
                     "logger.mode=disabled"], cwd=tmp_path, torchrun=2, timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = next((tmp_path / "outputs" / "torchrun").iterdir())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "val/top1" in line]
    assert evals and all(e["val/images"] == 1 for e in evals)
