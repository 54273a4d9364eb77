"""Train (or evaluate) a model. Reads top-down: the loss and evaluation, then `train()` =
setup -> train_one_epoch -> evaluate -> finish, then the process launcher and `main`.

    python train.py                                    # SparseFormer-nano on cluttered MNIST, CPU
                                                       # (2 single-threaded DDP ranks: hardware.processes=2)
    python train.py model=sparseformer_s data=imagenet data.root=/data/imagenet hardware=gpu
    python train.py experiment=sparseformer_t_imagenet # the paper's recipe (300 epochs)
    torchrun --nproc_per_node=8 train.py experiment=sparseformer_s_imagenet
    python train.py model=sparseformer_t model.pretrained=true data=...   # fine-tune the released weights
    python train.py run_dir=outputs/<old run> trainer.resume=auto      # continue a killed run
    python train.py trainer.eval_only=true model=sparseformer_t model.pretrained=<true|file> data=imagenet ...
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Before torch loads OpenMP: idle workers sleep instead of spinning, which on a small shared CPU
# otherwise stalls every op at a barrier (benchmark.py does the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import Data, average_view_probs, build_data, fold_views  # noqa: E402
from model import count_flops  # noqa: E402
from model.hub import read_checkpoint  # noqa: E402
from training import checkpoint as ckpt  # noqa: E402
from training import dist, lifecycle  # noqa: E402
from training.checkpoint import TrainState  # noqa: E402
from training.config import ConfigError, register_resolvers, resolve_hardware, resume_changes, validate  # noqa: E402
from training.logger import Logger  # noqa: E402
from training.optim import EMA, build_optimizer, lr_at  # noqa: E402
from training.visualize import draw_sampling, draw_tubes, figure_to_array  # noqa: E402

register_resolvers()  # hydra.run.dir uses it, so before @hydra.main runs
log = logging.getLogger("train")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -Σ_k target_k log softmax(logits)_k; logits (B, K), target (B, K) (the
    Mixup / CutMix / label-smoothing targets of data.augment)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


@torch.no_grad()
def view_averaged(model, x: torch.Tensor, views: int) -> torch.Tensor:
    """Scores (B, K) of a batch: its logits, or for items with several views (x (B, V, ...): Kinetics'
    clips x crops, data.InputSpec.views) the views' softmax probabilities averaged (the ranking is
    what top-1/top-5 read)."""
    if views == 1:
        return model(x)
    return average_view_probs(model(fold_views(x)), views)


def evaluate(model, loader, transform, info, precision, views: int = 1) -> dict:
    """Top-1 / top-5 (%) over the whole evaluation set from counts summed over ranks, the number of
    undecodable files skipped, and the throughput (items/s over all ranks) of the model's forward
    (`img_s`: what the accuracy-vs-throughput chart plots; rank 0's forward time, by CUDA events on a
    GPU) and of the whole loop (`img_s_wall`: with decoding and loading); items with several views
    are scored on their averaged logits."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=info.device)  # correct@1, correct@5, seen, skipped
    cuda = info.device.type == "cuda"
    forward_s, events = 0.0, []
    start = time.perf_counter()
    for x, y, skipped in loader:
        counts[3] += skipped
        if x is None:
            continue
        x, y = transform(x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True))
        if cuda:  # timed on the GPU's own clock: no host sync per batch
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        t0 = time.perf_counter()
        with autocast(info.device, precision):
            logits = view_averaged(model, x, views)
        if cuda:
            events[-1][1].record()
        else:
            forward_s += time.perf_counter() - t0
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top5 == y[:, None]
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(dim=-1).sum()
        counts[2] += y.numel()
    if cuda:
        torch.cuda.synchronize()
        forward_s = sum(a.elapsed_time(b) for a, b in events) / 1000
    elapsed = time.perf_counter() - start
    dist.all_reduce_sum(counts, info)
    elapsed, forward_s = dist.broadcast_object((elapsed, forward_s), info)  # rank 0's clock
    model.train(was_training)
    if counts[2].item() == 0:  # same counts on every rank: all stop, none reports a top-1 of nothing
        raise SystemExit(f"evaluation saw no decodable item ({int(counts[3].item())} files skipped as undecodable): "
                         "check the dataset's root and files")
    n = counts[2].item()
    return {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n, "n": int(counts[2].item()),
            "skipped": int(counts[3].item()), "img_s": n / max(forward_s, 1e-9), "img_s_wall": n / elapsed}


@torch.no_grad()
def roi_figure(model, images, transform, precision, cfg_data):
    """Each token's RoI and sampling points over a few validation images, for every sampling step
    (clips: each token's tube and points over the first clip's frames)."""
    x, _ = transform(images, torch.zeros(len(images), dtype=torch.long, device=images.device))
    was_training = model.training
    model.eval()
    with autocast(images.device, precision):
        out = model(x, return_aux=True)
    model.train(was_training)
    if x.dim() == 5:  # clips: the first clip's tubes over its frames
        fig = draw_tubes(x[0], [r[0] for r in out.rois], [p[0] for p in out.points], cfg_data.mean, cfg_data.std)
    else:
        fig = draw_sampling(x, out.rois, out.points, cfg_data.mean, cfg_data.std)
    return figure_to_array(fig)


@torch.no_grad()
def replica_max_abs_diff(model, info) -> float:
    """Largest |w_rank − w_rank0| over all parameters and ranks: 0.0 while DDP keeps the replicas in sync."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    ref = flat.clone()
    torch_dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    torch_dist.all_reduce(diff, op=torch_dist.ReduceOp.MAX)
    return diff.item()


@dataclass
class Run:
    """What one run holds, handed explicitly to each phase (no closures over changing locals)."""

    cfg: DictConfig
    run_dir: Path
    info: dist.DistInfo
    precision: str
    data: Data
    state: TrainState  # model, EMA, optimizer, scaler, schedule, step, sampler position
    ddp_model: nn.Module
    logger: Logger
    roi_images: torch.Tensor | None
    start_time: float
    train_skipped: int = 0
    cpu_start: float = 0.0  # time.process_time() at setup (trainer.cpu_budget_s)
    cpu_before: float = 0.0  # the training CPU seconds of the run before this start (its checkpoint's)
    result: dict | None = None

    @property
    def budget_spent(self) -> float:
        """The fraction of trainer.cpu_budget_s used, as of the last count_cpu (0 without a budget)."""
        budget = self.cfg.trainer.get("cpu_budget_s")
        return self.state.cpu_seconds / budget if budget else 0.0

    @property
    def max_steps(self) -> int:
        total = self.state.schedule["total_steps"]
        return min(self.cfg.trainer.max_steps or total, total)

    @property
    def finished(self) -> bool:
        tr = self.cfg.trainer
        return self.state.step >= self.max_steps or self.state.epoch >= tr.epochs or self.budget_spent >= 1

    def count_cpu(self) -> None:
        """state.cpu_seconds = CPU seconds (time.process_time, all threads) of the training processes,
        summed over ranks, the seconds before this start (a resumed run's, kept in its checkpoints)
        included; data-loader workers are not counted. One all-reduce: ranks agree."""
        spent = torch.tensor([time.process_time() - self.cpu_start], dtype=torch.float64, device=self.info.device)
        self.state.cpu_seconds = self.cpu_before + dist.all_reduce_sum(spent, self.info).item()

    def measure_budget(self) -> None:
        """Under trainer.cpu_budget_s, count_cpu at every step (budget_spent follows), so a run gets the
        same compute whatever else loads the machine, across resumes too."""
        if self.cfg.trainer.get("cpu_budget_s"):
            self.count_cpu()

    def save(self) -> None:
        """Collective: the checkpoint, with the CPU seconds up to now (under a budget, measure_budget
        counted them at this step)."""
        if not self.cfg.trainer.get("cpu_budget_s"):
            self.count_cpu()
        self.state.save(self.checkpoint_path, self.info)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / ckpt.LAST


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """The whole run; returns the final val top-1 (%). Tests call it with a composed config."""
    run = setup(cfg, run_dir)
    tr, state = cfg.trainer, run.state
    if not tr.eval_only and not run.finished and state.batch_in_epoch == 0 \
            and state.evaluated_epoch < state.epoch and state.epoch % tr.eval_every_epochs == 0:
        run.result = evaluate_and_log(run)  # the run stopped during the evaluation after its epoch-end checkpoint
    while not tr.eval_only and not run.finished:
        end_of_epoch = train_one_epoch(run)
        if run.finished or (end_of_epoch and run.state.epoch % tr.eval_every_epochs == 0):
            run.result = evaluate_and_log(run)
            if run.finished and end_of_epoch:  # the checkpoint records it: a longer resume does not redo it
                run.save()
    return finish(run)


# ---------------------------------------------------------------------------------------------- setup
def setup(cfg: DictConfig, run_dir: str | Path) -> Run:
    """Config checks, processes, data, model, optimizer, the resumed state (if any) and logging."""
    start_time = time.perf_counter()
    validate(cfg)
    device, precision, backend = resolve_hardware(cfg.hardware)
    if "LOCAL_RANK" in os.environ:  # a rank under torchrun: stop when torchrun dies, even by SIGKILL
        lifecycle.die_with_parent()
    info = dist.setup(device, backend)
    if not info.is_main:  # rank 0 reports; the other ranks only warn (e.g. an undecodable file in their share)
        logging.getLogger().setLevel(logging.WARNING)
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    # fp32 matmuls (and the Triton kernels' fp32 dots, kernels.backend.dot_precision): full fp32 unless
    # the run opts into TF32 ("high"/"medium")
    torch.set_float32_matmul_precision(cfg.hardware.matmul_precision)
    run_dir = Path(dist.broadcast_object(str(run_dir), info))  # rank 0's folder for all ranks
    if info.is_main:  # one owner per run folder; its leftovers from a killed write go
        lifecycle.lock_run_dir(run_dir)
        for p in lifecycle.remove_stale_temporaries(run_dir):
            log.info("removed %s, left by an interrupted write", p)

    data = build_data(cfg.data, info.world_size, info.rank, cfg.seed, info.device)
    if data.steps_per_epoch == 0 and not cfg.trainer.eval_only:  # else 0 steps, no checkpoint and exit 0
        raise SystemExit(f"{len(data.train_set)} training images ({data.train_sampler.num_samples} per process) "
                         f"< batch size {cfg.data.batch_size}: lower data.batch_size")
    read_once = use_checkpoint_model(cfg, run_dir, info, data.spec.model_kwargs())  # eval-only: read once
    for key, value in data.spec.model_kwargs().items():  # the dataset decides these: a different value is a mistake
        if cfg.model.get(key) is not None and cfg.model[key] != value:
            raise ConfigError(f"model.{key}={cfg.model[key]} but data={cfg.data.name} has {key}={value}: the dataset "
                              f"sets it; drop the override")
    with open_dict(cfg):  # the logged config must say what was built
        cfg.model.update(data.spec.model_kwargs())
    if info.is_main:
        log.info("run dir %s, world size %d, device %s\n%s", run_dir, info.world_size, info.device,
                 OmegaConf.to_yaml(cfg))
    model = build_model(cfg, info, from_checkpoint=resume_path(cfg, run_dir) is not None)
    flops = count_flops(model, data.spec.image_size, in_chans=data.spec.in_chans,  # before any RNG is set or restored
                        num_frames=data.spec.frames)  # (None for images)
    state = build_state(cfg, model, data, info, precision)
    resume(state, cfg, run_dir, info, read_once)
    # DDP: gradients are averaged over ranks in backward; everything else is per-rank code
    ddp_model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
        if info.enabled else model
    logger = Logger(cfg, run_dir, info.is_main, run_id=state.wandb_id)
    state.wandb_id = logger.run_id or state.wandb_id
    log_run_summary(cfg, state, data, info, logger, flops)
    return Run(cfg, run_dir, info, precision, data, state, ddp_model, logger, pick_roi_images(cfg, data, model, info),
               start_time, cpu_start=time.process_time(), cpu_before=state.cpu_seconds)


def use_checkpoint_model(cfg: DictConfig, run_dir: Path, info: dist.DistInfo,
                         from_data: dict) -> tuple[Path, dict] | None:
    """Eval-only from one of our checkpoints: evaluate the model it was trained as (its stored config),
    not the command line's (`from_data`: the keys the dataset sets, as the stored config has them).
    Returns (path, the checkpoint read) for `resume`, which then does not read it again; None when
    there is nothing to evaluate from."""
    path = resume_path(cfg, run_dir) if cfg.trainer.eval_only else None
    if path is None:
        return None
    checkpoint = read_checkpoint(path)
    stored = checkpoint.get("config", {}).get("model")
    if not stored:
        return path, checkpoint
    def built(model_cfg: dict) -> dict:  # the model a config builds here: the weights are the file's
        return {k: v for k, v in model_cfg.items() if k != "pretrained_ema"} | {"pretrained": False}

    stored = built(stored)
    if stored != built({**OmegaConf.to_container(cfg.model, resolve=True), **from_data}) and info.is_main:
        log.info("trainer.eval_only: evaluating the model stored in %s (%s), not model=%s", path, stored.get("name"),
                 cfg.model.get("name"))
    cfg.model = OmegaConf.create(stored)
    return path, checkpoint


def build_model(cfg: DictConfig, info: dist.DistInfo, from_checkpoint: bool = False) -> nn.Module:
    """The configured model, with the same initial weights on every rank. With `model.pretrained`,
    each machine's local rank 0 fetches the weights first (a download lands in the hub cache once);
    `from_checkpoint` (a resume, whose checkpoint holds the weights): model.pretrained is not read."""
    overrides = {}
    if from_checkpoint and cfg.model.get("pretrained"):
        overrides = {"pretrained": False} | ({"pretrained_ema": False} if "pretrained_ema" in cfg.model else {})
    fetch_first = bool(cfg.model.get("pretrained")) and info.enabled and not overrides
    if fetch_first and info.local_rank != 0:
        dist.barrier(info)
    torch.manual_seed(cfg.seed)
    model = hydra.utils.instantiate(cfg.model, **overrides)
    if fetch_first and info.local_rank == 0:
        dist.barrier(info)
    return model.to(info.device)


def lr_schedule(cfg: DictConfig, steps_per_epoch: int, world_size: int, warn: bool = True) -> dict:
    """training.optim.lr_at's parameters: the lr scales with the global batch unless optim.lr is set.
    `warn`: say so when the peak lr is below min_lr (rank 0 only: one line per run, not per rank)."""
    global_batch = cfg.data.batch_size * world_size
    base_lr = cfg.optim.lr or cfg.optim.base_lr * global_batch / cfg.optim.base_batch_size
    if warn and base_lr < cfg.schedule.min_lr:  # the cosine would rise from base_lr to min_lr
        how = f"optim.lr={cfg.optim.lr}" if cfg.optim.lr else (
            f"optim.base_lr={cfg.optim.base_lr} x global batch {global_batch} / optim.base_batch_size="
            f"{cfg.optim.base_batch_size}")
        log.warning("the peak lr %.3g (%s) is below schedule.min_lr=%g, so the cosine rises instead of decaying: "
                    "lower schedule.min_lr (e.g. 0), or set optim.lr", base_lr, how, cfg.schedule.min_lr)
    return dict(base_lr=base_lr, total_steps=cfg.trainer.epochs * steps_per_epoch, warmup_lr=cfg.schedule.warmup_lr,
                warmup_steps=round(cfg.schedule.warmup_epochs * steps_per_epoch), min_lr=cfg.schedule.min_lr)


def build_state(cfg: DictConfig, model: nn.Module, data: Data, info: dist.DistInfo, precision: str) -> TrainState:
    schedule = lr_schedule(cfg, data.steps_per_epoch, info.world_size, warn=info.is_main)
    return TrainState(
        model=model, ema=EMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema_decay else None,
        optimizer=build_optimizer(model, cfg.optim, schedule["base_lr"]),
        scaler=torch.amp.GradScaler(info.device.type, enabled=precision == "fp16"), schedule=schedule,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume` names: auto = this run dir's last one (None when it has none)."""
    resume_from = cfg.trainer.resume
    if not resume_from:
        return None
    return ckpt.find_last(run_dir) if resume_from == "auto" else Path(resume_from)


def resume(state: TrainState, cfg: DictConfig, run_dir: Path, info: dist.DistInfo,
           read_once: tuple[Path, dict] | None = None) -> None:
    """Seed the per-rank RNGs, then restore `trainer.resume` (auto = this run dir's last checkpoint);
    `read_once` is that checkpoint when the caller has read it already (use_checkpoint_model)."""
    torch.manual_seed(cfg.seed + info.rank)  # augmentation / drop path draws differ per rank
    np.random.seed((cfg.seed + info.rank) % 2**32)
    random.seed(cfg.seed + info.rank)
    path = resume_path(cfg, run_dir)
    if path is None:
        if cfg.trainer.eval_only:  # model.pretrained's weights: an "EMA" would be a copy of them
            state.ema = None
        if cfg.trainer.resume == "auto" and info.is_main:
            log.info("trainer.resume=auto: no checkpoint in %s, starting from scratch", run_dir / "checkpoints")
        return
    schedule, config = state.schedule, state.config
    checkpoint = read_once[1] if read_once is not None and read_once[0] == path else ckpt.load(path)
    ranks = len(checkpoint.get("rng") or []) or info.world_size  # the ranks that wrote it
    if not cfg.trainer.eval_only:  # before the weights: another model's would fail to load with less to say
        check_resumed_config(checkpoint.get("config") or {}, config, ranks, path, cfg.trainer.allow_config_change,
                             info)
    state.load_state_dict(checkpoint, info.rank)
    if cfg.trainer.eval_only:
        if not state.restored_ema:  # nothing to report as the EMA: not a fresh copy of random or raw weights
            state.ema = None
    else:
        old_batch = (checkpoint.get("config") or {}).get("data", {}).get("batch_size")
        if state.batch_in_epoch and (ranks != info.world_size or old_batch not in (None, cfg.data.batch_size)):
            # (allow_config_change) a sampler position counted in the old sharding means nothing now
            if info.is_main:
                log.warning("ranks or batch size changed mid-epoch: epoch %d restarts from its first batch",
                            state.epoch)
            state.batch_in_epoch = 0
        if state.ema is not None and not state.restored_ema and info.is_main:
            log.warning("%s holds no EMA: the EMA starts from its weights at step %d", path, state.step)
    if state.schedule != schedule and info.is_main:
        log.warning("the config's lr schedule %s differs from the checkpoint's %s: following the config",
                    schedule, state.schedule)
    state.schedule, state.config = schedule, config  # this run's, saved from now on
    if info.is_main:
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch, state.batch_in_epoch)


def check_resumed_config(saved: dict, now: dict, ranks: int, path: Path, allowed: bool, info: dist.DistInfo) -> None:
    """A resume continues the run it resumes: a setting that changes what is computed (model, data,
    optimiser, schedule, batch, seed, the number of ranks the checkpoint was written by;
    training.config.RESUME_MAY_CHANGE lists what may change) stops it with the list, unless
    trainer.allow_config_change=true (then it is logged)."""
    changes = resume_changes(saved, now) if saved else []
    if ranks != info.world_size:
        changes.append(f"ranks (world size): {ranks} -> {info.world_size}")
    if not changes:
        return
    listed = "; ".join(changes)
    if not allowed:
        raise ConfigError(f"trainer.resume: this command's config differs from the run in {path}: {listed}. Repeat "
                          "the run's own overrides (<run>/.hydra/overrides.yaml lists them), or add "
                          "trainer.allow_config_change=true to continue with these settings")
    if info.is_main:
        log.warning("trainer.allow_config_change: continuing %s with changed settings: %s", path, listed)


def log_run_summary(cfg: DictConfig, state: TrainState, data: Data, info: dist.DistInfo, logger: Logger,
                    flops: dict) -> None:
    """Parameters, MACs, batch and lr into W&B's summary, and what the run will do into the log."""
    spec, schedule = data.spec, state.schedule
    num_params = sum(p.numel() for p in state.model.parameters())
    global_batch = cfg.data.batch_size * info.world_size
    logger.summary({"params": num_params, "gmacs": flops["macs"] / 1e9,
                    "gmacs_without_mixing": flops["macs_without_mixing"] / 1e9, "image_size": spec.image_size,
                    "global_batch_size": global_batch, "base_lr": schedule["base_lr"], "world_size": info.world_size})
    if info.is_main:
        log.info("%s: %.2fM params, %.3f GMACs (%.3f without the mixing bmm) at %d px; global batch %d, lr %.2e",
                 cfg.model.name, num_params / 1e6, flops["macs"] / 1e9, flops["macs_without_mixing"] / 1e9,
                 spec.image_size, global_batch, schedule["base_lr"])
        if not cfg.trainer.eval_only:  # what the run will do, before it does it
            log.info("schedule: %d epochs of %d steps on %s (%d steps, %d of warm-up), lr %.2e -> %.1e; "
                     "change with trainer.epochs=N", cfg.trainer.epochs, data.steps_per_epoch, cfg.data.name,
                     schedule["total_steps"], schedule["warmup_steps"], schedule["base_lr"], schedule["min_lr"])


def pick_roi_images(cfg: DictConfig, data: Data, model: nn.Module, info: dist.DistInfo) -> torch.Tensor | None:
    """A few fixed validation images for the RoI figure (SparseFormer only; rank 0)."""
    if not (hasattr(model, "sampling_grad_scale") and cfg.logger.num_roi_images and info.is_main):
        return None
    k = min(cfg.logger.num_roi_images, len(data.val_set))
    items = (data.val_set[key] for key in data.val_loader.sampler)
    decodable = (it for it in items if it is not None)
    chosen = [it[0] for it, _ in zip(decodable, range(k), strict=False)]
    if not chosen:  # the evaluation stops the run with the reason; no figure to draw meanwhile
        log.warning("no decodable validation item for the RoI figure")
        return None
    if data.spec.views > 1:  # an item holds several views: draw the first
        chosen = [views[0] for views in chosen]
    return torch.stack(chosen).to(info.device)


# ---------------------------------------------------------------------------------------------- training
def set_sampling_grad_scale(model: nn.Module, scale: float) -> None:
    """The sampling-gradient clamp follows the loss scale (docs/MODEL.md step 4): set it on every
    SparseFormer inside `model`, e.g. the image model of the frame-averaged video baseline."""
    for m in model.modules():
        if hasattr(m, "sampling_grad_scale"):
            m.sampling_grad_scale = scale


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, weight: float = 1.0) -> tuple[torch.Tensor, float]:
    """One optimizer step on a uint8 batch, its loss multiplied by `weight` (0: a rank's stand-in step,
    see train_one_epoch); returns (the detached loss, the lr it used)."""
    state, model = run.state, run.state.model
    # under trainer.cpu_budget_s the schedule runs at the pace of the budget (it ends when either ends)
    lr = lr_at(max(state.step, round(run.budget_spent * state.schedule["total_steps"])), **state.schedule)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    device = run.info.device
    x, target = run.data.train_transform(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    set_sampling_grad_scale(model, state.scaler.get_scale() if state.scaler.is_enabled() else 1.0)
    with autocast(device, run.precision):
        logits = run.ddp_model(x)
    loss = soft_target_cross_entropy(logits, target)
    if hasattr(model, "auxiliary_loss"):  # a model's own extra loss of this forward (A-ViT's ponder + prior)
        loss = loss + model.auxiliary_loss()
    if weight != 1.0:
        loss = loss * weight
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if run.cfg.optim.clip_grad:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.cfg.optim.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.ema is not None:
        state.ema.update(model)
    state.step += 1
    return loss.detach(), lr


def stand_in_batch(spec) -> tuple[torch.Tensor, torch.Tensor]:
    """One black uint8 item of the dataset's input shape, class 0: what a DDP rank whose first batch
    was all undecodable steps on (with zero weight)."""
    shape = (1, spec.in_chans) + ((spec.frames,) if spec.frames else ()) + (spec.image_size, spec.image_size)
    return torch.zeros(shape, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)


def train_one_epoch(run: Run) -> bool:
    """Train from the sampler position to the end of the epoch (or max_steps), logging every
    log_every_steps and checkpointing every ckpt_every_steps and at the end. Returns whether the
    epoch is complete."""
    cfg, state, data, info = run.cfg, run.state, run.data, run.info
    data.train_sampler.set_epoch(state.epoch, start=state.batch_in_epoch * cfg.data.batch_size)
    bar = tqdm(total=data.steps_per_epoch, initial=state.batch_in_epoch, desc=f"epoch {state.epoch}",
               disable=not info.is_main, mininterval=2.0, dynamic_ncols=True)
    # since the last log line: the sum of the finite losses, their steps, images, this rank's files
    # skipped this epoch, steps with a non-finite loss; kept on the device: no host sync per step
    window, t0 = torch.zeros(5, dtype=torch.float64, device=info.device), time.perf_counter()
    epoch_skipped, epoch_steps, last_batch, bad_streak = 0, 0, None, 0

    def log_window() -> None:
        """Log the window (all ranks: it all-reduces), then start a new one. Called at log steps and
        before every checkpoint, so a resumed run's windows are the uninterrupted run's, and each epoch's
        last steps since a log line are logged too."""
        nonlocal window, t0, bad_streak
        window[3] = epoch_skipped
        loss_sum, n_steps, n_images, n_skipped, n_bad = dist.all_reduce_sum(window, info).tolist()
        run.train_skipped = max(run.train_skipped, int(n_skipped))  # over all ranks
        # fp16: a forward that overflows on one batch is a step the GradScaler skips (inf gradients),
        # so the run goes on unless every step overflows: log windows with no finite step on any rank,
        # 10 rank-steps per rank in a row at least (counted at log steps: no host sync per step);
        # without a scaler the weights take the NaN at once
        bad_streak = 0 if n_steps else bad_streak + n_bad
        if n_bad and (not state.scaler.is_enabled() or bad_streak >= 10 * info.world_size):
            raise FloatingPointError(f"training loss is not finite at step {state.step} ({int(n_bad)} of the "
                                     f"{int(n_bad + n_steps)} rank-steps since the last log line)")
        if n_steps or n_bad:  # (neither: every rank took only stand-in steps since the last line)
            img_s = n_images / (time.perf_counter() - t0)
            mean = {"train/loss": loss_sum / n_steps} if n_steps else {}  # of the finite losses
            run.logger.log({**mean, "train/lr": lr, "train/img_s": img_s,
                            "train/epoch": state.step / data.steps_per_epoch,
                            "train/skipped_files": run.train_skipped, "train/nonfinite_steps": n_bad},
                           state.step)
            bar.set_postfix(loss=f"{loss_sum / n_steps:.3f}" if n_steps else "inf", lr=f"{lr:.2e}",
                            img_s=f"{img_s:.0f}")
        window, t0 = torch.zeros_like(window), time.perf_counter()

    for x, y, skipped in data.train_loader:
        state.batch_in_epoch += 1
        epoch_skipped += skipped  # unreadable reads this epoch (= bad files when data.augment.repeats=1)
        bar.update(1)
        if x is None:  # every file of the batch was undecodable
            if not info.enabled:
                continue
            # Under DDP every rank must take every step (a skipped step would pair this rank's gradient
            # all-reduce with the others' next step: a hang or diverged replicas). This rank steps with
            # zero weight on its last batch: it adds nothing to the averaged gradient.
            loss, lr = train_step(run, *(last_batch or stand_in_batch(data.spec)), weight=0.0)
        else:
            last_batch, epoch_steps = (x, y), epoch_steps + 1
            loss, lr = train_step(run, x, y)
            finite = torch.isfinite(loss)
            window[0] += torch.where(finite, loss, 0.0)
            window[1] += finite
            window[2] += len(x)
            window[4] += ~finite
        if state.step % cfg.logger.log_every_steps == 0 or state.step == run.max_steps:
            log_window()
        run.measure_budget()
        if cfg.trainer.ckpt_every_steps and state.step % cfg.trainer.ckpt_every_steps == 0:
            log_window()
            saving = time.perf_counter()
            run.save()
            t0 += time.perf_counter() - saving  # train/img_s is training's rate, not the disk's
        if state.step >= run.max_steps or run.budget_spent >= 1:
            break
    log_window()  # the steps since the last line, before the epoch's checkpoint
    bar.close()
    counts = torch.tensor([epoch_skipped, epoch_steps], dtype=torch.float64, device=info.device)
    epoch_skipped, epoch_steps = (int(v) for v in dist.all_reduce_sum(counts, info).tolist())  # over all ranks
    run.train_skipped = max(run.train_skipped, epoch_skipped)
    end_of_epoch = state.batch_in_epoch >= data.steps_per_epoch
    if end_of_epoch and epoch_skipped and not epoch_steps:
        raise SystemExit(f"no decodable training file under {cfg.data.get('root') or cfg.data._target_}: "
                         f"all {epoch_skipped} files of an epoch were skipped (see the warnings above)")
    if end_of_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    run.save()
    return end_of_epoch


# ---------------------------------------------------------------------------------------------- evaluate, finish
def evaluate_and_log(run: Run) -> dict:
    """Raw and EMA weights on the whole evaluation set, logged (and the RoI figure)."""
    state, data, info = run.state, run.data, run.info
    views = data.spec.views
    for module in (state.model, state.ema and state.ema.module):  # rank 0's BatchNorm statistics: its checkpoint's
        if module is not None:
            dist.broadcast_buffers(module, info)
    # the module, not its DDP wrapper: DDP's forward may broadcast buffers (a collective) first, and a
    # rank whose evaluation share is empty or undecodable runs no forward: the others would wait
    res = evaluate(state.model, data.val_loader, data.eval_transform, info, run.precision, views)
    res_ema = evaluate(state.ema.module, data.val_loader, data.eval_transform, info, run.precision, views) \
        if state.ema else None
    metrics = {"val/top1": res["top1"], "val/top5": res["top5"], "val/images": res["n"],
               "val/img_s": res["img_s"], "val/img_s_wall": res["img_s_wall"], "val/skipped_files": res["skipped"],
               "epoch": state.epoch}
    if res_ema:
        metrics.update({"val_ema/top1": res_ema["top1"], "val_ema/top5": res_ema["top5"]})
    run.logger.log(metrics, state.step)
    run.logger.log_accuracy_vs_throughput(res["img_s"], res["top1"], res_ema and res_ema["top1"], state.step)
    if run.roi_images is not None:
        figure = roi_figure(state.model, run.roi_images, data.eval_transform, run.precision, run.cfg.data)
        run.logger.log_image("val/rois", figure, f"tokens' RoIs and sampling points per sampling step, "
                             f"step {state.step}", state.step)
    state.evaluated_epoch = state.epoch
    if info.is_main:
        ema_txt = f", EMA top-1 {res_ema['top1']:.2f} top-5 {res_ema['top5']:.2f}" if res_ema else ""
        log.info("step %d epoch %d: val top-1 %.2f top-5 %.2f on %d images (%.0f img/s forward, %.0f with loading)%s%s",
                 state.step, state.epoch, res["top1"], res["top5"], res["n"], res["img_s"], res["img_s_wall"], ema_txt,
                 f"; {res['skipped']} undecodable files skipped" if res["skipped"] else "")
    return {"top1": res["top1"], "top5": res["top5"], "top1_ema": res_ema and res_ema["top1"],
            "top5_ema": res_ema and res_ema["top5"]}


def finish(run: Run) -> float:
    """The final evaluation (if the loop did not end with one), DDP replica check, W&B summary and
    result.json (rank 0: the final top-1/top-5, raw and EMA, the step, and the wall time since this
    process's setup started: without Python's start-up and, under the launcher, torchrun's)."""
    state, info, logger = run.state, run.info, run.logger
    result = run.result or evaluate_and_log(run)  # eval-only, or resumed a finished run
    if run.train_skipped and info.is_main:
        # reads, not distinct files: under data.augment.repeats an epoch reads a file 0 to r times
        log.warning("undecodable training files: %d reads skipped in the epoch with the most (each file is "
                    "named, once per loader worker, in the warnings above)", run.train_skipped)
    if info.enabled:
        diff = replica_max_abs_diff(state.model, info)
        logger.summary({"ddp/replica_max_abs_diff": diff})
        if info.is_main:
            log.info("DDP replicas after training: max |w_rank - w_rank0| = %g", diff)
    logger.summary({"final/top1": result["top1"], "final/top1_ema": result["top1_ema"], "final/step": state.step,
                    "train/skipped_files_total": run.train_skipped})
    if info.is_main:
        out = {**result, "step": state.step, "wall_s": round(time.perf_counter() - run.start_time, 1),
               "world_size": info.world_size}
        ckpt.save_atomic(out, run.run_dir / "result.json", save=lambda o, p: p.write_text(json.dumps(o, indent=1)))
    logger.finish()
    # the DDP wrapper (its reducer holds the process group) goes before the group does: freed after
    # destroy_process_group, at some later garbage collection, gloo's destructor could wait for a peer
    # that had exited (a rank hung at exit)
    run.ddp_model = None
    gc.collect()
    dist.teardown(info)
    return result["top1"]


# ---------------------------------------------------------------------------------------------- processes, CLI
def launches_processes(cfg: DictConfig) -> bool:
    """hardware.processes > 1 in a plain `python train.py` (not already under torchrun or a Slurm job
    of several tasks, which start their own processes)."""
    return cfg.hardware.processes > 1 and not under_a_launcher()


def under_a_launcher() -> bool:
    """A rank that torchrun or a Slurm job of several tasks started (they handle signals themselves)."""
    return "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def launch_local_processes(cfg: DictConfig, run_dir: str, overrides: list[str]) -> float | None:
    """Rerun this command as `torchrun --standalone --nproc_per_node=N train.py <same overrides>` in
    this run folder, with the machine's cores split between the N processes, and wait for it.

    On a small CPU, N single-threaded DDP processes beat one N-threaded process: most ops of a
    small model are too small for intra-op threads (cluttered MNIST on 2 cores: ~1.5x the img/s).
    """
    n = cfg.hardware.processes
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = cfg.hardware.num_threads or max(1, cores // n)
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("run_dir=", "hardware.num_threads="))]
    cmd = [sys.executable, "-c", lifecycle.TORCHRUN_QUIET, "--standalone", f"--nproc_per_node={n}",
           str(Path(__file__).resolve()), *keep, f"run_dir={Path(run_dir).resolve()}",
           f"hardware.num_threads={threads}", "hydra.output_subdir=null"]  # .hydra/: this command's, written above
    # (the command as torchrun's own CLI spells it: cmd[1:3] is the quiet wrapper's `-c <script>`)
    log.info("hardware.processes=%d: launching %d local processes of %d thread(s) each (torchrun %s)", n, n, threads,
             " ".join(cmd[3:]))
    lifecycle.lock_run_dir(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **lifecycle.child_lock_env(run_dir),
           "SPARSEFORMER_LAUNCHED": "1"}
    lifecycle.take_rank_failure(run_dir)  # a stale one from an earlier launch in this folder
    returncode = lifecycle.run_child(cmd, env)
    failure = lifecycle.take_rank_failure(run_dir)
    if returncode in (-signal.SIGINT, -signal.SIGTERM):
        raise SystemExit(interrupted(run_dir, overrides))  # the user's own (keep dropped hardware.num_threads)
    if failure:
        raise SystemExit(f"training failed: {failure} (traceback in {run_dir}/train.log)")
    if returncode:
        raise SystemExit(f"the {n} training processes failed (exit code {returncode}); see {run_dir}/train.log")
    result = Path(run_dir) / "result.json"
    return json.loads(result.read_text())["top1"] if result.is_file() else None


def interrupted(run_dir: str | Path, overrides: list[str]) -> str:
    """The line a stopped run ends with: its last checkpoint's step and the command that continues it."""
    last = ckpt.find_last(Path(run_dir))
    resume = "trainer.resume=auto"
    given = [o for o in overrides if o.lstrip("+~").startswith("trainer.resume=")]
    if last is None and given and Path(given[-1].split("=", 1)[1]).is_file():
        # stopped before its first checkpoint: `auto` would start from scratch; the file it began from
        resume, last = given[-1].lstrip("+~"), Path(given[-1].split("=", 1)[1])
    step = ckpt.load(last).get("step", "?") if last else 0
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("run_dir=", "trainer.resume="))]
    command = shlex.join(["python", "train.py", *keep, f"run_dir={Path(run_dir).resolve()}", resume])
    return f"interrupted at step {step} (the last checkpoint); resume with: {command}"


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    overrides = HydraConfig.get().overrides.task
    try:
        validate(cfg)
        resolve_hardware(cfg.hardware)  # the device exists, checked before any process is launched
    except ConfigError as e:  # one line that names the key and the reason, no traceback
        raise SystemExit(f"config error: {e}") from None
    if cfg.trainer.resume == "auto" and not any(o.startswith("run_dir=") for o in overrides) \
            and "RANK" not in os.environ:  # a new folder never has a checkpoint: say which run to continue
        raise SystemExit("config error: trainer.resume=auto continues the run in run_dir=; add "
                         "run_dir=<the run folder to continue> (printed in the first line of its train.log)")
    run_dir = HydraConfig.get().runtime.output_dir
    if launches_processes(cfg):
        return launch_local_processes(cfg, run_dir, overrides)
    single = not under_a_launcher()  # one process of our own
    if single:  # `kill PID` stops it as Ctrl-C does: the line below, not a silent end
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return train(cfg, run_dir)
    except KeyboardInterrupt:
        if not single:
            raise
        raise SystemExit(interrupted(run_dir, overrides)) from None
    except Exception as e:
        if os.environ.get("SPARSEFORMER_LAUNCHED") != "1":
            if isinstance(e, ConfigError):  # found once the checkpoint is read (a resume's changed settings)
                raise SystemExit(f"config error: {e}") from None
            raise
        # a rank of our own launcher: the traceback goes to train.log, one line to the launcher
        lifecycle.record_rank_failure(run_dir, e, int(os.environ.get("RANK", "0")))
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
