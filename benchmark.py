"""Benchmark SparseFormer against dense baselines over token counts and resolutions.

    python benchmark.py                          # default CPU sweep (conf/sweep/cpu.yaml), < 10 min on 2 cores
    python benchmark.py sweep=full               # the whole grid, for a GPU
    python benchmark.py sweep.models=[sparseformer_t,deit_small] sweep.resolutions=[224,512] sweep.modes=[inference]
    python benchmark.py accuracy_file=acc.csv    # + accuracy-vs-throughput plot (CSV columns model,top1)
    python benchmark.py mode=kernels             # kernel micro-benchmarks (kernels/benchmark.py)
    python benchmark.py mode=memory              # activation memory and step time of the memory options
    python benchmark.py mode=tradeoff            # train SparseFormer-nano, DeiT, A-ViT, a CNN on one CPU budget;
                                                 # top-1 vs throughput with ToMe (training/tradeoff.py)

Every point (model, tokens, resolution, mode) reports: throughput (img/s at sweep.batch_size, median
of sweep.repeats timed calls after warm-up), batch-1 latency (median), peak memory, parameters and
MACs per image counted from the real ops (model.count_flops; forward pass, also for training steps).
Points are timed round-robin, one call each per round, so a change in machine load hits every
model of a comparison alike: all points of a mode together (sweep.interleave=mode, the CPU default,
so that ratios across resolutions are side by side too) or per resolution (=resolution, for GPU grids
too large to hold every model at once). A training step is forward +
cross-entropy + backward + AdamW step. Peak memory: the bytes of the tensors the point holds before
one step (weights, gradients, optimizer state, inputs) plus the peak rise of allocated memory during
that step: on CUDA from torch.cuda.max_memory_allocated, on CPU the peak of the torch CPU allocator's
running total read from the profiler's memory events (RSS would count the allocator's cache and
every earlier point).
An out-of-memory point is recorded with status=oom and the sweep goes on.

Writes to the run directory (Hydra's output dir): results.csv, results.json, summary.txt and PNG
plots; logs the same to W&B (offline by default, files under <run dir>/wandb).
"""
from __future__ import annotations

import csv
import ctypes
import json
import logging
import os

# Idle OpenMP threads sleep instead of spinning (read when torch loads OpenMP, so before `import torch`).
# On a shared or oversubscribed CPU, spinning workers wait for descheduled ones at every op's barrier:
# measured here (2 shared cores) SparseFormer-T ran 2.9x and DeiT-S 1.7x slower with the spin default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig
from tqdm import tqdm

from model import count_flops, create_model, list_models
from model.factory import accepted_arguments, model_class, model_defaults, takes_clips
from model.memory import saved_bytes_per_sample
from model.sparseformer import VARIANTS as SPARSEFORMER_VARIANTS
from model.sparseformer import SparseFormer
from training.logger import benchmark_run
from training.report import markdown_table

log = logging.getLogger("benchmark")

COLUMNS = [
    "model", "tokens", "resolution", "frames", "batch_size", "mode", "backend", "device", "precision",
    "throughput_img_s", "latency_ms", "peak_mem_mb", "saved_mib_per_img", "params", "gmacs", "gmacs_without_mixing",
    "status", "threads", "repeats", "throughput_min_img_s", "throughput_max_img_s",
]  # fmt: skip
MODES = ("inference", "train")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- the points of a sweep
@dataclass(frozen=True)
class Point:
    """One measurement: `tokens` is None for a model's default token count (and for dense models);
    `frames` is set for video models (clips of that many frames)."""

    model: str
    tokens: int | None
    resolution: int
    mode: str
    frames: int | None = None


def is_sparseformer(name: str) -> bool:
    return name.startswith("sparseformer")


MIN_RESOLUTION = 8  # the smallest image any model here takes (SparseFormer's stem)


def check_ints(section: str, values: dict, minimum: dict | None = None) -> None:
    """SweepConfigError unless each value (an integer or a list of them) is an integer >= its minimum:
    `minimum[key]`, else MIN_RESOLUTION for a resolution and 1 for anything else (0 repeats time nothing,
    a median of nothing; a negative warm-up is silently none). Found before the first point is timed."""
    for key, value in values.items():
        items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
        low = (minimum or {}).get(key, MIN_RESOLUTION if "resolution" in key else 1)
        bad = [v for v in items if not isinstance(v, int) or isinstance(v, bool) or v < low]
        if bad:
            plural = isinstance(value, (list, tuple, ListConfig))
            if low == 1:
                what = "positive integers" if plural else "a positive integer"
            else:
                unit = " (pixels)" if "resolution" in key else ""
                what = ("integers" if plural else "an integer") + f" >= {low}{unit}"
            raise SweepConfigError(f"{section}.{key}={value!r}: must be {what}, got {bad[0]!r}")


def check_reference(section: str, reference) -> None:
    """A misspelled reference would drop the ratio lines silently (one that is not swept has none)."""
    if reference is not None and reference not in list_models():
        raise SweepConfigError(f"{section}.reference={reference!r}: unknown model; known: {list_models()} "
                               "(null: no ratio lines)")


def sweep_points(sweep: DictConfig) -> list[Point]:
    """Resolution sweep (every model at its default token count) + token sweep (SparseFormer models
    at sweep.token_resolution); with sweep.grid, every token count at every resolution."""
    unknown = [m for m in sweep.modes if m not in MODES] + [m for m in sweep.models if m not in list_models()]
    if unknown:
        raise SweepConfigError(f"unknown mode(s) / model(s) {unknown}; modes: {list(MODES)}, models: {list_models()}")
    clips = [m for m in sweep.models if takes_clips(m)]
    if clips:
        raise SweepConfigError(f"sweep.models={clips}: video model(s), which take clips; put them in "
                               "sweep.video.models")
    check_ints("sweep", {"resolutions": sweep.resolutions, "tokens": sweep.tokens,
                          "token_resolution": sweep.token_resolution})
    check_reference("sweep", sweep.reference)
    resolutions = list(dict.fromkeys([*sweep.resolutions, *([sweep.token_resolution] if sweep.tokens else [])]))
    points: list[Point] = []
    for mode in sweep.modes:
        for name in sweep.models:
            for res in resolutions:
                if mode == "train" and sweep.train_max_resolution is not None and res > sweep.train_max_resolution:
                    continue
                if not is_sparseformer(name):
                    dense_max = sweep.dense_max_resolution
                    if res in sweep.resolutions and (dense_max is None or res <= dense_max):
                        points.append(Point(name, None, res, mode))
                    continue
                default = SPARSEFORMER_VARIANTS[name]["num_tokens"]
                counts = list(sweep.tokens) if sweep.grid or res == sweep.token_resolution else []
                if mode == "train" and not sweep.train_token_sweep:
                    counts = []
                for t in [None, *counts]:
                    points.append(Point(name, None if t in (None, default) else int(t), res, mode))
        points += video_points(sweep, mode)
    return list(dict.fromkeys(points))


def video_points(sweep: DictConfig, mode: str) -> list[Point]:
    """sweep.video: every video model at every frame count at video.resolution; VideoSparseFormer also
    at each of video.tokens (spatial tokens per replicate) at video.token_frames."""
    video = sweep.get("video")
    if not video or not video.models:
        return []
    unknown = [m for m in video.models if m not in list_models()]
    if unknown:
        raise SweepConfigError(f"unknown video model(s) {unknown}; models: {list_models()}")
    images = [m for m in video.models if not takes_clips(m)]
    if images:
        raise SweepConfigError(f"sweep.video.models={images}: image model(s); put them in sweep.models (a video "
                               f"model takes clips: {[m for m in list_models() if takes_clips(m)]})")
    check_ints("sweep.video", {"frames": video.frames, "tokens": video.tokens, "resolution": video.resolution,
                                "token_frames": video.token_frames})
    check_reference("sweep.video", video.get("reference"))
    points = []
    for name in video.models:
        for frames in video.frames:
            points.append(Point(name, None, video.resolution, mode, int(frames)))
        if is_video_sparseformer(name):
            points += [Point(name, int(t), video.resolution, mode, int(video.token_frames)) for t in video.tokens]
    return points


def is_video_sparseformer(name: str) -> bool:
    return name.startswith("videosparseformer")




def uses_backend(name: str) -> bool:
    """The model runs our kernels (a SparseFormer, or an image SparseFormer per frame): backend= applies."""
    cls, defaults = model_class(name), model_defaults(name)
    return "backend" in accepted_arguments(cls) or is_sparseformer(str(defaults.get("image_model", "")))


def model_overrides(point: Point, backend: str) -> dict:
    """create_model overrides of a point: the backend, token count, resolution and frames, each where
    the model has it (a SparseFormer reads any size; a ViT is built for one; the CNN has no tokens)."""
    accepted = accepted_arguments(model_class(point.model))
    overrides: dict = {}
    if "backend" in accepted:
        overrides["backend"] = backend
    elif uses_backend(point.model):  # FrameAveraged: the image model's
        overrides["image_kwargs"] = {**(model_defaults(point.model).get("image_kwargs") or {}), "backend": backend}
    if point.tokens is not None:
        overrides["num_tokens"] = point.tokens
    if "img_size" in accepted:
        overrides["img_size"] = point.resolution
    if point.frames is not None and "num_frames" in accepted:
        overrides["num_frames"] = point.frames
    return overrides


def build_model(point: Point, backend: str) -> nn.Module:
    """The model of a point on the CPU (moved to the device by the caller)."""
    return create_model(point.model, **model_overrides(point, backend))


def token_count(model: nn.Module, resolution: int) -> int | None:
    """SparseFormer (or one per frame): its latent tokens; a ViT: its sequence length (patches + class
    token; ViViT: tubelets); a model without tokens (the CNN): None."""
    inner = getattr(model, "image_model", model)
    if isinstance(inner, SparseFormer):
        return inner.num_tokens
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None:
        return None
    frames = getattr(model, "num_frames", None)  # ViViT: tubelets of tubelet_size frames
    per_frame = (resolution // patch_embed.stride[-1]) ** 2
    return (per_frame * (frames // model.tubelet_size) if frames else per_frame) + 1


# ----------------------------------------------------------------------------- one step, timed
def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MEASURED_STEP = "benchmark::measured_step"  # the profiler label of the step whose peak memory is read


class Runner:
    """Holds a model with its inputs (batch and batch-1) and runs one inference call or training step."""

    def __init__(self, model: nn.Module, mode: str, batch_size: int, resolution: int, device: torch.device,
                 precision: str, seed: int, frames: int | None = None):
        self.model, self.mode, self.device = model, mode, device
        self.autocast_dtype = PRECISIONS[precision]
        gen = torch.Generator().manual_seed(seed)
        num_classes = getattr(model, "num_classes", 1000)
        self.inputs = {}
        for b in {batch_size, 1}:
            c = getattr(model, "in_chans", None) or 3
            shape = (b, c, resolution, resolution) if frames is None else (b, c, frames, resolution, resolution)
            x = torch.randn(shape, generator=gen).to(device)
            y = torch.randint(0, num_classes, (b,), generator=gen).to(device)
            self.inputs[b] = (x, y)
        if mode == "train":
            model.train()
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
            self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        else:
            model.eval()

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, batch_size: int) -> None:
        x, y = self.inputs[batch_size]
        if self.mode == "inference":
            with torch.inference_mode(), self._autocast():
                self.model(x)
            return
        with self._autocast():
            loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def timed(self, batch_size: int) -> float:
        """Seconds for one step, synchronised on GPU."""
        synchronize(self.device)
        t0 = time.perf_counter()
        self.step(batch_size)
        synchronize(self.device)
        return time.perf_counter() - t0

    def held_bytes(self) -> int:
        """Bytes of the tensors this runner keeps alive: parameters, gradients, optimizer state, inputs."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.mode == "train":
            tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        tensors += [t for pair in self.inputs.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def peak_memory_mb(self, batch_size: int) -> float:
        """Peak bytes during one step (see the module docstring for what is measured on each device)."""
        held = self.held_bytes()
        if self.device.type == "cuda":  # other models of the group may be resident: count only this one's
            synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(batch_size)
            synchronize(self.device)
            return (held + torch.cuda.max_memory_allocated(self.device) - before) / 2**20
        # The profiler sees the frees of blocks allocated inside it only: a training step frees the last
        # step's gradients (zero_grad after the forward), so it runs one step unmeasured under the
        # profiler first and measures the second (else its peak counts the gradients twice).
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            if self.mode == "train":
                self.step(batch_size)
                held = self.held_bytes()  # now with the gradients and optimizer state (sweep.warmup=0: new)
            with torch.profiler.record_function(MEASURED_STEP):
                self.step(batch_size)
        results = prof.profiler.kineto_results.events()
        start = min(e.start_ns() for e in results if e.name() == MEASURED_STEP)
        cpu = torch._C._autograd.DeviceType.CPU
        events = sorted((e.start_ns(), e.nbytes()) for e in results
                        if e.name() == "[memory]" and e.device_type() == cpu)
        rise = peak = 0  # from what the step starts with: `held` (the unmeasured step's gradients are in it)
        for t, nbytes in events:
            if t >= start:
                rise += nbytes
                peak = max(peak, rise)
        return (held + peak) / 2**20


# ----------------------------------------------------------------------------- the sweep
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ValueError(f"device must be auto, cpu or cuda[:i], got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name} but no CUDA device is visible; use device=cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def _row(point: Point, cfg: DictConfig, device: torch.device, **values) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(model=point.model, resolution=point.resolution, frames=point.frames, batch_size=cfg.sweep.batch_size,
               mode=point.mode, device=str(device), precision=cfg.precision,
               backend=cfg.backend if uses_backend(point.model) else "dense",
               threads=torch.get_num_threads(), repeats=cfg.sweep.repeats)
    row.update(values)
    return row


def write_profile(runner: Runner, batch_size: int, path: Path) -> None:
    """One step of `runner` under torch.profiler: its ops by self time (device time on GPU), to `path`."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        runner.step(batch_size)
        synchronize(runner.device)
    sort = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    ops = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"one {runner.mode} step, batch {batch_size}, under torch.profiler (its overhead included)\n\n"
        + ops.table(sort_by=sort, row_limit=25)
        + "\n\nby input shape:\n"
        + prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=25, max_name_column_width=40,
                                                              max_shapes_column_width=80)
        + "\n"
    )


def run_sweep(cfg: DictConfig, device: torch.device, progress: bool = True,
              profile_dir: Path | None = None) -> list[dict]:
    """Measure every point of cfg.sweep; returns one row per point (COLUMNS), in sweep order. With
    profile_dir, each point then runs one more step under torch.profiler, after its timed rounds
    (write_profile: profile_dir/<model>_<tokens>tok_<res>px[_<frames>f]_<mode>.txt)."""
    sweep = cfg.sweep
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {cfg.precision!r}")
    points = sweep_points(sweep)
    if sweep.interleave not in ("mode", "resolution"):
        raise ValueError(f"sweep.interleave must be mode or resolution, got {sweep.interleave!r}")
    groups: dict[tuple, list[Point]] = {}
    for p in points:  # the points of a group stay in memory together and are timed round-robin
        groups.setdefault((p.mode,) if sweep.interleave == "mode" else (p.mode, p.resolution), []).append(p)
    rows: dict[Point, dict] = {}
    flops_cache: dict[tuple, dict] = {}
    steps_per_point = sweep.warmup + sweep.repeats + sweep.latency_repeats + 1
    bar = tqdm(total=len(points) * steps_per_point, desc="benchmark", unit="step", disable=not progress)
    for group in groups.values():
        runners: dict[Point, Runner] = {}
        times: dict[Point, list[float]] = {}
        latencies: dict[Point, list[float]] = {}
        static: dict[Point, dict] = {}
        done = dict.fromkeys(group, 0)  # progress-bar steps done per point

        def record_oom(p: Point, where: str, err: BaseException, static=static, runners=runners) -> None:
            log.warning("out of memory: %s at %d px (%s, %s): %s", p.model, p.resolution, p.mode, where,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            rows[p] = _row(p, cfg, device, status="oom", **static.get(p, {}))
            runners.pop(p, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()

        for p in group:
            res = p.resolution
            bar.set_postfix_str(f"{p.model} t={p.tokens or 'default'} {res}px {p.mode} (warm-up)")
            torch.manual_seed(cfg.seed)
            model = build_model(p, cfg.backend)
            static[p] = dict(tokens=token_count(model, res), params=sum(t.numel() for t in model.parameters()))
            runner = None
            try:
                runner = Runner(model.to(device), p.mode, sweep.batch_size, res, device, cfg.precision, cfg.seed,
                                p.frames)
                key = (p.model, p.tokens, res, p.frames)
                if key not in flops_cache:  # one batch-1 forward under FlopCounterMode
                    flops_cache[key] = count_flops(model, res, num_frames=p.frames)
                static[p]["gmacs"] = flops_cache[key]["macs"] / 1e9
                static[p]["gmacs_without_mixing"] = flops_cache[key]["macs_without_mixing"] / 1e9
                for _ in range(sweep.warmup):
                    runner.step(sweep.batch_size)
                    runner.step(1)
                    bar.update(1)
                    done[p] += 1
                static[p]["peak_mem_mb"] = runner.peak_memory_mb(sweep.batch_size)
                if p.mode == "train":  # activation memory: what autograd keeps for backward, per image
                    x = runner.inputs[sweep.batch_size][0]
                    static[p]["saved_mib_per_img"] = saved_bytes_per_sample(model, x, PRECISIONS[cfg.precision]) / 2**20
                bar.update(1)
                done[p] += 1
            except Exception as err:  # noqa: BLE001  (anything but an OOM is re-raised)
                if not is_oom(err):
                    raise
                model = runner = None  # noqa: F841  (free the point's memory before going on)
                record_oom(p, "warm-up", err)
                bar.update(steps_per_point - done[p])
                continue
            runners[p], times[p], latencies[p] = runner, [], []
        # Round-robin: each round times every live point once, so load drift hits them alike.
        for r in range(max(sweep.repeats, sweep.latency_repeats)):
            for p in list(runners):
                bar.set_postfix_str(f"{p.mode} round {r + 1}: {p.model} {p.resolution}px")
                try:
                    if r < sweep.repeats:
                        times[p].append(runners[p].timed(sweep.batch_size))
                        bar.update(1)
                        done[p] += 1
                    if r < sweep.latency_repeats:
                        latencies[p].append(runners[p].timed(1))
                        bar.update(1)
                        done[p] += 1
                except Exception as err:  # noqa: BLE001
                    if not is_oom(err):
                        raise
                    record_oom(p, f"timed round {r + 1}", err)
                    bar.update(steps_per_point - done[p])
        for p in runners:
            if profile_dir is not None:  # after every point's timed rounds
                frames = f"_{p.frames}f" if p.frames else ""
                name = f"{p.model}_{static[p]['tokens']}tok_{p.resolution}px{frames}_{p.mode}.txt"
                write_profile(runners[p], sweep.batch_size, profile_dir / name)
            throughputs = [sweep.batch_size / t for t in times[p]]
            rows[p] = _row(
                p, cfg, device, status="ok", **static[p],
                throughput_img_s=statistics.median(throughputs),
                throughput_min_img_s=min(throughputs),
                throughput_max_img_s=max(throughputs),
                latency_ms=statistics.median(latencies[p]) * 1e3 if latencies[p] else None,
            )
        runners.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return [rows[p] for p in points]


# ----------------------------------------------------------------------------- outputs
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(rows: list[dict], run_dir: Path, meta: dict) -> list[Path]:
    """results.csv (COLUMNS) and results.json ({"meta", "rows"}) in run_dir."""
    csv_path, json_path = run_dir / "results.csv", run_dir / "results.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return [csv_path, json_path]


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def _resolution_rows(rows: list[dict]) -> list[dict]:
    """Rows at each model's default token count (dense models: all their rows)."""
    return [r for r in rows if not is_sparseformer(r["model"])
            or r["tokens"] == SPARSEFORMER_VARIANTS[r["model"]]["num_tokens"]]


def plot_results(rows: list[dict], run_dir: Path, accuracy: dict[str, float] | None = None,
                 base_resolution: int = 224) -> list[Path]:
    """PNG plots: throughput vs resolution, throughput vs tokens, accuracy vs throughput (if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(rows)
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    paths = []
    title = f"{ok[0]['device']}, {ok[0]['precision']}, batch {ok[0]['batch_size']}" if ok else ""
    video = [r for r in ok if r["frames"] is not None]
    ok = [r for r in ok if r["frames"] is None]  # image rows; the video rows get their own plot

    def figure(n):
        fig, axes = plt.subplots(1, max(n, 1), figsize=(5.2 * max(n, 1), 3.8), squeeze=False)
        return fig, axes[0]

    def save(fig, name):
        path = run_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)

    if video:
        fig, axes = figure(len(modes))
        for ax, mode in zip(axes, modes, strict=True):
            def series(r):  # a ViViT's sequence grows with the frames; a SparseFormer's tokens do not
                return r["model"], r["tokens"] if is_video_sparseformer(r["model"]) else None

            for key in dict.fromkeys(series(r) for r in video if r["mode"] == mode):
                pts = sorted((r["frames"], r["throughput_img_s"]) for r in video
                             if series(r) == key and r["mode"] == mode)
                ax.plot(*zip(*pts, strict=True), marker="o", label=key[0] + (f" ({key[1]} tokens)" if key[1] else ""))
            ax.set(xlabel="frames", ylabel="throughput (clips/s)", title=f"{mode} ({title})", yscale="log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "throughput_vs_frames.png")

    if not ok:
        return paths
    by_res = _resolution_rows(ok)
    fig, axes = figure(len(modes))
    for ax, mode in zip(axes, modes, strict=True):
        for name in dict.fromkeys(r["model"] for r in by_res if r["mode"] == mode):
            pts = sorted((r["resolution"], r["throughput_img_s"]) for r in by_res
                         if r["model"] == name and r["mode"] == mode)
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set(xlabel="resolution (px)", ylabel="throughput (img/s)", title=f"{mode} ({title})", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, "throughput_vs_resolution.png")

    sf = [r for r in ok if is_sparseformer(r["model"]) and r["resolution"] == base_resolution]
    if sf:
        fig, axes = figure(len(modes))
        for ax, mode in zip(axes, modes, strict=True):
            for name in dict.fromkeys(r["model"] for r in sf if r["mode"] == mode):
                pts = sorted((r["tokens"], r["throughput_img_s"]) for r in sf
                             if r["model"] == name and r["mode"] == mode)
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            for r in ok:  # dense baselines at the same resolution, as horizontal lines
                if not is_sparseformer(r["model"]) and r["mode"] == mode and r["resolution"] == base_resolution:
                    ax.axhline(r["throughput_img_s"], ls="--", lw=1, color="gray")
                    ax.annotate(r["model"], (0.01, r["throughput_img_s"]), xycoords=("axes fraction", "data"),
                                fontsize=7, va="bottom", color="gray")
            ax.set(xlabel="latent tokens", ylabel="throughput (img/s)", title=f"{mode}, {base_resolution} px ({title})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        save(fig, "throughput_vs_tokens.png")

    if accuracy:
        pts = [(r["throughput_img_s"], accuracy[r["model"]], r["model"]) for r in by_res
               if r["mode"] == "inference" and r["resolution"] == base_resolution and r["model"] in accuracy]
        if pts:
            fig, axes = figure(1)
            ax = axes[0]
            for x, y, name in pts:
                ax.scatter(x, y, color="C0" if is_sparseformer(name) else "C1")
                ax.annotate(name, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
            ax.set(xlabel="inference throughput (img/s)", ylabel="top-1 (%)", xscale="log",
                   title=f"accuracy vs throughput, {base_resolution} px ({title})")
            ax.grid(alpha=0.3)
            save(fig, "accuracy_vs_throughput.png")
    return paths


def read_accuracy_file(path: str | Path) -> dict[str, float]:
    """CSV with columns model,top1 -> {model: top1}."""
    path = Path(hydra.utils.to_absolute_path(str(path)))
    if not path.is_file():
        raise ValueError(f"accuracy_file={path} does not exist (expected a CSV with columns model,top1)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"model", "top1"} <= set(reader.fieldnames):
            raise ValueError(f"accuracy_file={path} must have columns model,top1; found {reader.fieldnames}")
        return {row["model"]: float(row["top1"]) for row in reader}


def format_rows(rows: list[dict]) -> str:
    """Markdown table of the result rows."""
    cols = [("model", ""), ("tokens", ""), ("resolution", ""), ("frames", ""), ("mode", ""),
            ("throughput_img_s", ".2f"), ("latency_ms", ".1f"), ("peak_mem_mb", ".0f"), ("saved_mib_per_img", ".1f"),
            ("params", ","),
            ("gmacs", ".2f"), ("gmacs_without_mixing", ".2f"), ("status", "")]
    return markdown_table(rows, cols)


def measure_gemm_peak(device: torch.device, precision: str, repeats: int = 7) -> float:
    """This device's square-GEMM rate in GMAC/s (median of `repeats`; 2048^3 on CPU, 8192^3 on GPU) in
    the sweep's precision: what a model made only of large matmuls could reach, the yardstick for
    the achieved GMAC/s of each row."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = PRECISIONS[precision] or torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(repeats + 2):  # two warm-up calls
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return n**3 / statistics.median(times[2:]) / 1e9


def achieved_gmacs_s(row: dict) -> float:
    """Counted MACs per second that a row's model achieved (throughput x GMACs per image)."""
    return row["throughput_img_s"] * row["gmacs"]


def format_video_ratios(rows: list[dict], reference: str | None, gemm_peak: float | None = None) -> str:
    """Each video model's clips/s against `reference` (sweep.video.reference) at the same frames and mode,
    with the ratio of counted MACs (what the throughput ratio would be at equal efficiency) and both
    models' achieved GMAC/s (against `gemm_peak`, this device's GEMM rate, when given) for inference:
    the counted MACs are the forward pass's, a training step does ~3x as many."""
    ok = [r for r in _ok(rows) if r["frames"] is not None]
    ref = {(r["frames"], r["mode"]): r for r in ok if r["model"] == reference}
    peak = f" of a {gemm_peak:.0f} GMAC/s GEMM peak" if gemm_peak else ""
    lines = []
    for r in ok:
        base = ref.get((r["frames"], r["mode"]))
        if r["model"] != reference and base:
            rate = (f"; achieved {achieved_gmacs_s(r):.1f} vs {achieved_gmacs_s(base):.1f} GMAC/s{peak}"
                    if r["mode"] == "inference" else "")  # (forward MACs: a training step's rate would be ~3x)
            lines.append(
                f"{r['mode']:9s} {r['frames']:3d} frames  {r['model']} ({r['tokens']} tokens) / {reference} = "
                f"{r['throughput_img_s'] / base['throughput_img_s']:.2f}x  (MACs {base['gmacs'] / r['gmacs']:.2f}x "
                f"fewer{rate})")
    return "\n".join(lines)


def format_ratios(rows: list[dict], reference: str, base_resolution: int) -> str:
    """Throughput ratios computed from the rows: each model against `reference` at the same resolution
    and mode (default token counts), and each model's throughput at each resolution against its own at
    base_resolution."""
    ok = _resolution_rows([r for r in _ok(rows) if r["frames"] is None])
    tput = {(r["model"], r["resolution"], r["mode"]): r["throughput_img_s"] for r in ok}
    lines = []
    for (name, res, mode), value in tput.items():
        ref = tput.get((reference, res, mode))
        if name != reference and ref:
            lines.append(f"{mode:9s} {res:5d} px  {name} / {reference} = {value / ref:.2f}x")
    for (name, res, mode), value in tput.items():
        base = tput.get((name, base_resolution, mode))
        if res != base_resolution and base:
            lines.append(f"{mode:9s} {name}: throughput at {res} px / at {base_resolution} px = {value / base:.1%}")
    return "\n".join(lines)


def log_wandb(cfg: DictConfig, rows: list[dict], files: list[Path], meta: dict, run_dir: Path) -> None:
    """Log the rows (a table and one entry per point) and the plots to W&B; files stay in run_dir/wandb."""
    run = benchmark_run(cfg, run_dir, run_dir.name, meta)
    if run is None:
        return
    import wandb

    try:
        run.log({"results": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])})
        for path in files:
            if path.suffix == ".png":
                run.log({f"plots/{path.stem}": wandb.Image(str(path))})
        for r in _ok(rows):
            frames = f"/{r['frames']}f" if r["frames"] else ""
            key = f"{r['mode']}/{r['model']}/t{r['tokens']}/{r['resolution']}px{frames}"
            run.summary[f"{key}/throughput_img_s"] = r["throughput_img_s"]
            run.summary[f"{key}/latency_ms"] = r["latency_ms"]
    finally:
        run.finish()


# ----------------------------------------------------------------------------- entry points
def run_kernels(cfg: DictConfig, device: torch.device, run_dir: Path) -> list[dict]:
    """mode=kernels: kernels/benchmark.py's micro-benchmarks, written as kernels.csv / kernels.json."""
    from kernels.benchmark import CPU_MAX_BATCH, format_table, run_kernel_benchmarks

    k = cfg.kernels
    if device.type == "cpu" and not any(b <= CPU_MAX_BATCH for b in k.batch_sizes):
        raise SweepConfigError(f"kernels.batch_sizes={list(k.batch_sizes)}: the CPU runs batches <= {CPU_MAX_BATCH} "
                               f"only (the references alone take seconds there); add one, or run on a GPU")
    if device.index is not None:  # the kernel benchmarks run on the current CUDA device
        torch.cuda.set_device(device)
    rows = run_kernel_benchmarks(device=device.type, dtypes=list(k.dtypes), batch_sizes=list(k.batch_sizes),
                                 variants=list(k.variants), repeats=k.repeats, passes=list(k.passes))
    table = format_table(rows)
    print(table)
    (run_dir / "kernels.txt").write_text(table + "\n")
    if rows:
        with (run_dir / "kernels.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (run_dir / "kernels.json").write_text(json.dumps({"meta": machine_info(device), "rows": rows}, indent=1))
    print(f"kernel benchmark written to {run_dir}/kernels.txt, kernels.csv and kernels.json")
    return rows


MEMORY_OPTIONS = {  # the SparseFormer keys that trade activation memory for compute (docs/BENCHMARKS.md)
    "eager": dict(fused_sample_mix=False, recompute_stem=False),
    "fused": dict(fused_sample_mix=True, recompute_stem=False),
    "fused+recompute_stem": dict(fused_sample_mix=True, recompute_stem=True),
    "fused+recompute_stem+checkpoint_cortex": dict(fused_sample_mix=True, recompute_stem=True,
                                                   checkpoint_cortex=True),
}


def run_memory(cfg: DictConfig, device: torch.device, run_dir: Path) -> list[dict]:
    """mode=memory: per option set of MEMORY_OPTIONS, SparseFormer's saved-for-backward bytes per
    image (autograd's saved-tensor hooks) and its training-step time, all timed round-robin in one
    run (medians); written as memory.csv / memory.json / memory.txt."""
    mem = cfg.memory
    if mem.model not in SPARSEFORMER_VARIANTS:  # the options below are SparseFormer's (backend, recompute, ...)
        raise SweepConfigError(f"memory.model={mem.model!r}: mode=memory measures an image SparseFormer's "
                               f"activation-memory options; pick one of {sorted(SPARSEFORMER_VARIANTS)}")
    check_ints("memory", {"resolution": mem.resolution, "batch_size": mem.batch_size})
    rows, runners, times = [], {}, {}
    for name, options in MEMORY_OPTIONS.items():
        torch.manual_seed(cfg.seed)
        model = create_model(mem.model, backend=cfg.backend, **options).to(device)
        runner = Runner(model, "train", mem.batch_size, mem.resolution, device, cfg.precision, cfg.seed)
        x = runner.inputs[mem.batch_size][0]
        saved = saved_bytes_per_sample(model, x, PRECISIONS[cfg.precision]) / 2**20
        for _ in range(cfg.sweep.warmup):
            runner.step(mem.batch_size)
        runners[name], times[name] = runner, []
        rows.append(dict(model=mem.model, options=name, resolution=mem.resolution, batch_size=mem.batch_size,
                         backend=cfg.backend, precision=cfg.precision, device=str(device), saved_mib_per_img=saved))
    for _ in range(cfg.sweep.repeats):
        for name, runner in runners.items():
            times[name].append(runner.timed(mem.batch_size))
    base = statistics.median(times["eager"])
    for row in rows:
        step = statistics.median(times[row["options"]])
        row.update(step_ms=step * 1e3, step_time_vs_eager=step / base)
    cols = [("options", ""), ("saved_mib_per_img", ".1f"), ("step_ms", ".0f"), ("step_time_vs_eager", ".3f")]
    meta = machine_info(device)
    table = "\n".join(
        [f"{mem.model} at {mem.resolution} px, batch {mem.batch_size}, backend={cfg.backend}, {cfg.precision}, "
         f"{device}; median of {cfg.sweep.repeats} steps, round-robin; {meta['cpu']}, {meta['date_utc']} UTC", "",
         markdown_table(rows, cols)])
    print(table)
    (run_dir / "memory.txt").write_text(table + "\n")
    with (run_dir / "memory.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"memory benchmark written to {run_dir}/memory.txt, memory.csv and memory.json")
    return rows


MMAP_THRESHOLD = 1 << 30  # bytes: buffers below it come from the heap, not from mmap
TRIM_THRESHOLD = 2**31 - 1  # bytes: free heap kept at its top, the most a C int holds (~2 GiB: a 1024 px
# SparseFormer-T batch frees ~1.5 GB per call; at 1 GiB it went back to the OS and was faulted in again)


def keep_freed_memory() -> bool:
    """glibc only: raise the mmap and trim thresholds (mallopt) so that freed activation buffers stay
    in the heap for the next call instead of going back to the OS and being page-faulted in again
    (what jemalloc / tcmalloc give PyTorch CPU inference). Every model of the sweep runs under it."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt(int, int): both values must fit a C int (ctypes wraps larger ones silently: 4 << 30 passed
    # as the trim threshold became 0, which trims the heap on every free, the opposite of the intent)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class SweepConfigError(ValueError):
    """A sweep setting that cannot give a measurement."""


def run(cfg: DictConfig, run_dir: Path, progress: bool = True) -> list[dict]:
    """The whole benchmark into run_dir; returns the result rows."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    device = resolve_device(cfg.device)
    malloc_tuned = device.type == "cpu" and cfg.keep_freed_memory and keep_freed_memory()
    if cfg.mode == "kernels":
        check_ints("kernels", {"repeats": cfg.kernels.repeats}, {"repeats": 1})
        return run_kernels(cfg, device, run_dir)
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {cfg.precision!r}")
    check_ints("sweep", {k: cfg.sweep[k] for k in ("batch_size", "repeats", "latency_repeats", "warmup")},
                 {"batch_size": 1, "repeats": 1, "latency_repeats": 0, "warmup": 0})
    if cfg.mode == "memory":
        return run_memory(cfg, device, run_dir)
    if cfg.mode == "tradeoff":
        from training.tradeoff import run_tradeoff

        return run_tradeoff(cfg, run_dir, machine_info(device))
    if cfg.mode != "sweep":
        raise ValueError(f"mode must be sweep, kernels, memory or tradeoff, got {cfg.mode!r}")
    accuracy = read_accuracy_file(cfg.accuracy_file) if cfg.accuracy_file else None
    started = time.perf_counter()
    rows = run_sweep(cfg, device, progress=progress, profile_dir=run_dir / "profiles" if cfg.profile else None)
    meta = machine_info(device)
    meta["keep_freed_memory"] = malloc_tuned
    meta["sweep_seconds"] = round(time.perf_counter() - started, 1)
    meta["gemm_peak_gmacs_s"] = round(measure_gemm_peak(device, cfg.precision), 1)
    files = write_results(rows, run_dir, meta)
    files += plot_results(rows, run_dir, accuracy, base_resolution=cfg.sweep.token_resolution)
    summary = "\n".join([
        f"machine: {meta['cpu']} ({meta['cpu_count']} cores, {meta['torch_threads']} torch threads, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']})"
        + (f", GPU {meta['gpu']}" if "gpu" in meta else "") + f"; torch {meta['torch']}; {meta['date_utc']} UTC",
        f"device={device} backend={cfg.backend} precision={cfg.precision} batch_size={cfg.sweep.batch_size} "
        f"repeats={cfg.sweep.repeats} (median) keep_freed_memory={malloc_tuned}; sweep took {meta['sweep_seconds']} s; "
        f"GEMM peak {meta['gemm_peak_gmacs_s']} GMAC/s",
        "",
        format_rows(rows),
        "",
        format_ratios(rows, cfg.sweep.reference, cfg.sweep.token_resolution),
        format_video_ratios(rows, cfg.sweep.get("video", {}).get("reference"), meta["gemm_peak_gmacs_s"]),
    ])  # fmt: skip
    (run_dir / "summary.txt").write_text(summary + "\n")
    files.append(run_dir / "summary.txt")
    print(summary)
    log_wandb(cfg, rows, files, meta, run_dir)
    print(f"results: {run_dir}")
    return rows


@hydra.main(config_path="conf", config_name="benchmark", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except SweepConfigError as e:  # a bad setting: one line, no traceback
        raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
    main()
