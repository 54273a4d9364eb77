"""Train (or evaluate) a SparseFormer. Reads top-down: config -> processes -> data -> model ->
optimizer -> resume -> loop (step, log, checkpoint, evaluate) -> finish.

    python train.py                                    # SparseFormer-nano on cluttered MNIST, CPU
                                                       # (2 single-threaded DDP ranks: hardware.processes=2)
    python train.py model=sparseformer_s data=imagenet data.root=/data/imagenet hardware=gpu
    python train.py experiment=sparseformer_t_imagenet # the paper's recipe (300 epochs)
    torchrun --nproc_per_node=8 train.py experiment=sparseformer_s_imagenet
    python train.py run_dir=outputs/<old run> trainer.resume=auto      # continue a killed run
    python train.py trainer.eval_only=true trainer.checkpoint=<ours or the authors' .pth> ...
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

# Before torch loads OpenMP: idle workers sleep instead of spinning, which on a small shared CPU
# otherwise stalls every op at a barrier (benchmark.py does the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as torch_dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import build_data, soft_target_cross_entropy
from model import count_flops, load_official_checkpoint
from training import checkpoint as ckpt
from training import dist
from training.config import ConfigError, register_resolvers, resolve_hardware, validate
from training.logger import Logger
from training.optim import EMA, build_optimizer, lr_at
from training.visualize import draw_sampling, figure_to_array

register_resolvers()  # hydra.run.dir uses it, so before @hydra.main runs
log = logging.getLogger("train")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model, loader, transform, info, precision) -> dict:
    """Top-1 / top-5 (%) over the whole evaluation set from counts summed over ranks, the number of
    undecodable files skipped, and the measured throughput (img/s over all ranks)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=info.device)  # correct@1, correct@5, seen, skipped
    start = time.perf_counter()
    for x, y, skipped in loader:
        counts[3] += skipped
        if x is None:
            continue
        x, y = transform(x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True))
        with autocast(info.device, precision):
            logits = model(x)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top5 == y[:, None]
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(dim=-1).sum()
        counts[2] += y.numel()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    dist.all_reduce_sum(counts, info)
    elapsed = dist.broadcast_object(elapsed, info)  # rank 0's clock
    model.train(was_training)
    n = max(counts[2].item(), 1)
    return {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n, "n": int(counts[2].item()),
            "skipped": int(counts[3].item()), "img_s": counts[2].item() / elapsed}


@torch.no_grad()
def roi_figure(model, images, transform, precision, cfg_data):
    """Each token's RoI and sampling points over a few validation images, for every sampling step."""
    x, _ = transform(images, torch.zeros(len(images), dtype=torch.long, device=images.device))
    was_training = model.training
    model.eval()
    with autocast(images.device, precision):
        out = model(x, return_aux=True)
    model.train(was_training)
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


def load_weights(model, path: str, fmt: str, overrides: dict):
    """(model, EMA state or None) from our checkpoint (weights into `model`), or the authors'
    released file (any wrapper): then a SparseFormer built for those weights, via the model's
    converter, with `overrides` (e.g. backend) applied."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    ours = isinstance(obj, dict) and {"model", "step", "config"} <= set(obj)
    if fmt == "ours" or (fmt == "auto" and ours):
        model.load_state_dict(obj["model"])
        return model, obj.get("ema")
    return load_official_checkpoint(obj, **overrides), None


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        validate(cfg)
    except ConfigError as e:  # one line that names the key and the reason, no traceback
        raise SystemExit(f"config error: {e}") from None
    run_dir = HydraConfig.get().runtime.output_dir
    if launches_processes(cfg):
        return launch_local_processes(cfg, run_dir, HydraConfig.get().overrides.task)
    return train(cfg, run_dir)


def launches_processes(cfg: DictConfig) -> bool:
    """hardware.processes > 1 in a plain `python train.py` (not already under torchrun or a Slurm job
    of several tasks, which start their own processes)."""
    already = "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    return cfg.hardware.processes > 1 and not already


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(Path(__file__).resolve()), *keep, f"run_dir={Path(run_dir).resolve()}", f"hardware.num_threads={threads}"]
    log.info("hardware.processes=%d: launching %d local processes of %d thread(s) each (%s)", n, n, threads,
             " ".join(cmd[1:6]))
    returncode = subprocess.call(cmd)
    if returncode:
        raise SystemExit(f"the {n} training processes failed (exit code {returncode}); see {run_dir}/train.log")
    result = Path(run_dir) / "result.json"
    return json.loads(result.read_text())["top1"] if result.is_file() else None


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """The whole run; returns the final val top-1 (%). Tests call it with a composed config."""
    # ------------------------------------------------------------------ config and processes
    start_time = time.perf_counter()
    validate(cfg)
    device, precision, backend = resolve_hardware(cfg.hardware)
    info = dist.setup(device, backend)
    if not info.is_main:  # rank 0 reports; the other ranks only warn (e.g. an undecodable file in their share)
        logging.getLogger().setLevel(logging.WARNING)
    if cfg.hardware.num_threads:
        torch.set_num_threads(cfg.hardware.num_threads)
    run_dir = Path(dist.broadcast_object(str(run_dir), info))  # rank 0's folder for all ranks
    device, tr = info.device, cfg.trainer

    # ------------------------------------------------------------------ data
    data = build_data(cfg.data, info.world_size, info.rank, cfg.seed, device)
    image_size = cfg.data.get("image_size") or cfg.data.get("canvas_size")
    with open_dict(cfg):  # the dataset decides these; the logged config must say what was built
        cfg.model.num_classes, cfg.model.in_chans = data.num_classes, data.in_chans
    if info.is_main:
        log.info("run dir %s, world size %d, device %s\n%s", run_dir, info.world_size, info.device,
                 OmegaConf.to_yaml(cfg))

    # ------------------------------------------------------------------ model
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = hydra.utils.instantiate(cfg.model, num_classes=data.num_classes, in_chans=data.in_chans)
    ema_state = None
    if tr.checkpoint:
        overrides = {k: cfg.model[k] for k in ("backend", "drop_path_rate") if k in cfg.model}
        model, ema_state = load_weights(model, tr.checkpoint, tr.checkpoint_format, overrides)
    num_params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, image_size, in_chans=data.in_chans)
    model.to(device)
    ema = EMA(model, tr.ema_decay) if tr.ema_decay else None
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)
    # DDP: gradients are averaged over ranks in backward; everything else is per-rank code
    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if info.enabled else model

    # ------------------------------------------------------------------ optimizer, schedule, AMP
    global_batch = cfg.data.batch_size * info.world_size
    base_lr = cfg.optim.lr or cfg.optim.base_lr * global_batch / cfg.optim.base_batch_size
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    total_steps = cfg.trainer.epochs * data.steps_per_epoch
    schedule = dict(base_lr=base_lr, total_steps=total_steps, warmup_lr=cfg.schedule.warmup_lr,
                    warmup_steps=round(cfg.schedule.warmup_epochs * data.steps_per_epoch), min_lr=cfg.schedule.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    has_sampling = hasattr(model, "sampling_grad_scale")  # SparseFormer, not DeiT

    # ------------------------------------------------------------------ resume
    step, epoch, batch_in_epoch, run_id = 0, 0, 0, None
    torch.manual_seed(cfg.seed + info.rank)  # augmentation / drop path draws differ per rank
    np.random.seed((cfg.seed + info.rank) % 2**32)
    random.seed(cfg.seed + info.rank)
    resume = ckpt.find_last(run_dir) if tr.resume == "auto" else (Path(tr.resume) if tr.resume else None)
    if tr.resume == "auto" and resume is None and info.is_main:
        log.info("trainer.resume=auto: no checkpoint in %s, starting from scratch", run_dir / "checkpoints")
    if resume is not None:
        state = ckpt.load(resume)
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch, run_id = state["step"], state["epoch"], state["batch_in_epoch"], state["wandb_id"]
        rng = state["rng"]
        ckpt.set_rng_state(rng[info.rank] if info.rank < len(rng) else rng[0])
        if info.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume, step, epoch, batch_in_epoch)

    def save_checkpoint(epoch_: int, batch_: int) -> None:
        rng_states = [None] * info.world_size
        if info.enabled:
            torch_dist.all_gather_object(rng_states, ckpt.rng_state())
        else:
            rng_states = [ckpt.rng_state()]
        if info.is_main:
            ckpt.save_atomic({
                "model": model.state_dict(), "ema": ema.state_dict() if ema else None,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "epoch": epoch_, "batch_in_epoch": batch_, "rng": rng_states, "wandb_id": logger.run_id,
                "config": OmegaConf.to_container(cfg, resolve=True),
            }, run_dir / "checkpoints" / ckpt.LAST)
        dist.barrier(info)

    # ------------------------------------------------------------------ logging
    logger = Logger(cfg, run_dir, info.is_main, run_id=run_id)
    logger.summary({"params": num_params, "gmacs": flops["macs"] / 1e9,
                    "gmacs_without_mixing": flops["macs_without_mixing"] / 1e9, "image_size": image_size,
                    "global_batch_size": global_batch, "base_lr": base_lr, "world_size": info.world_size})
    if info.is_main:
        log.info("%s: %.2fM params, %.3f GMACs (%.3f without the mixing bmm) at %d px; global batch %d, lr %.2e",
                 cfg.model.name, num_params / 1e6, flops["macs"] / 1e9, flops["macs_without_mixing"] / 1e9,
                 image_size, global_batch, base_lr)
    roi_images = None
    if has_sampling and cfg.logger.num_roi_images and info.is_main:
        k = min(cfg.logger.num_roi_images, len(data.val_set))
        items = (data.val_set[key] for key in data.val_loader.sampler)
        roi_images = torch.stack([it[0] for it, _ in zip((it for it in items if it is not None), range(k))]).to(device)

    def run_evaluation() -> dict:
        res = evaluate(ddp_model, data.val_loader, data.eval_transform, info, precision)
        res_ema = evaluate(ema.module, data.val_loader, data.eval_transform, info, precision) if ema else None
        metrics = {"val/top1": res["top1"], "val/top5": res["top5"], "val/images": res["n"],
                   "val/skipped_files": res["skipped"], "epoch": epoch}
        if res_ema:
            metrics.update({"val_ema/top1": res_ema["top1"], "val_ema/top5": res_ema["top5"]})
        logger.log(metrics, step)
        logger.log_accuracy_vs_throughput(res["img_s"], res["top1"], res_ema and res_ema["top1"], step)
        if roi_images is not None:
            logger.log_image("val/rois", roi_figure(model, roi_images, data.eval_transform, precision, cfg.data),
                             f"tokens' RoIs and sampling points per sampling step, step {step}", step)
        if info.is_main:
            ema_txt = f", EMA top-1 {res_ema['top1']:.2f} top-5 {res_ema['top5']:.2f}" if res_ema else ""
            log.info("step %d epoch %d: val top-1 %.2f top-5 %.2f on %d images (%.0f img/s)%s%s", step, epoch,
                     res["top1"], res["top5"], res["n"], res["img_s"], ema_txt,
                     f"; {res['skipped']} undecodable files skipped" if res["skipped"] else "")
        return {"top1": res["top1"], "top1_ema": res_ema and res_ema["top1"]}

    def finish(result: dict) -> float:
        """result.json (rank 0): the final numbers and the wall time since train() started."""
        if info.is_main:
            out = {**result, "step": step, "wall_s": round(time.perf_counter() - start_time, 1),
                   "world_size": info.world_size}
            ckpt.save_atomic(out, run_dir / "result.json", save=lambda o, p: p.write_text(json.dumps(o, indent=1)))
        logger.finish()
        dist.teardown(info)
        return result["top1"]

    if tr.eval_only:
        return finish(run_evaluation())

    # ------------------------------------------------------------------ training loop
    max_steps = min(tr.max_steps or total_steps, total_steps)
    train_skipped, result, done = 0, None, step >= max_steps
    ddp_model.train()
    while not done and epoch < cfg.trainer.epochs:
        data.train_sampler.set_epoch(epoch, start=batch_in_epoch * cfg.data.batch_size)
        bar = tqdm(total=data.steps_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch}",
                   disable=not info.is_main, mininterval=2.0, dynamic_ncols=True)
        # loss sum, steps, images since the last log line, kept on the device: no host sync per step
        window, t0 = torch.zeros(3, dtype=torch.float64, device=device), time.perf_counter()
        for x, y, skipped in data.train_loader:
            batch_in_epoch += 1
            train_skipped += skipped
            bar.update(1)
            if x is None:  # every file of the batch was undecodable
                continue
            lr = lr_at(step, **schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, target = data.train_transform(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            if has_sampling:  # the sampling-gradient clamp follows the loss scale (SPEC.md step 4)
                model.sampling_grad_scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            with autocast(device, precision):
                logits = ddp_model(x)
            loss = soft_target_cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            step += 1
            window[0] += loss.detach()
            window[1] += 1
            window[2] += len(x)

            if step % cfg.logger.log_every_steps == 0 or step == max_steps:
                loss_sum, n_steps, n_images = dist.all_reduce_sum(window, info).tolist()
                img_s, mean_loss = n_images / (time.perf_counter() - t0), loss_sum / n_steps
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"training loss is {mean_loss} at step {step}")
                logger.log({"train/loss": mean_loss, "train/lr": lr, "train/img_s": img_s,
                            "train/epoch": step / data.steps_per_epoch, "train/skipped_files": train_skipped}, step)
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
                window, t0 = torch.zeros_like(window), time.perf_counter()
            if tr.ckpt_every_steps and step % tr.ckpt_every_steps == 0:
                save_checkpoint(epoch, batch_in_epoch)
            if step >= max_steps:
                done = True
                break
        bar.close()
        end_of_epoch = batch_in_epoch >= data.steps_per_epoch
        if end_of_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
        save_checkpoint(epoch, batch_in_epoch)
        if done or (end_of_epoch and epoch % tr.eval_every_epochs == 0) or epoch == cfg.trainer.epochs:
            result = run_evaluation()
    if train_skipped and info.is_main:
        log.warning("%d undecodable training files were skipped", train_skipped)
    if result is None:  # resumed a finished run
        result = run_evaluation()
    if info.enabled:
        diff = replica_max_abs_diff(model, info)
        logger.summary({"ddp/replica_max_abs_diff": diff})
        if info.is_main:
            log.info("DDP replicas after training: max |w_rank - w_rank0| = %g", diff)
    logger.summary({"final/top1": result["top1"], "final/top1_ema": result["top1_ema"], "final/step": step,
                    "train/skipped_files_total": train_skipped})
    return finish(result)


if __name__ == "__main__":
    main()
