"""`python benchmark.py mode=tradeoff`: accuracy against measured throughput on the embedded data.

1. train: every model of `tradeoff.models` is trained by `train.py` with the same CPU-time budget
   (trainer.cpu_budget_s), `tradeoff.jobs` single-threaded runs at a time, each in <run dir>/train/<key>;
   or its earlier run is reused (`tradeoff.checkpoints.<key>=<train.py run dir>` or
   `tradeoff.reuse=<earlier trade-off run dir>`): its result.json and checkpoints/last.pt.
2. settings: each trained model as trained, plus ToMe at every `tradeoff.tome.r` on the weights of
   `tradeoff.tome.model` (a DeiT: tome_r is a setting, not a weight).
3. measure, in this process, side by side: top-1 on the whole evaluation set; throughput (img/s at
   `tradeoff.batch_size`, median of `tradeoff.repeats` rounds, every setting once per round, real
   evaluation images so that A-ViT halts as it would) and batch-1 latency (median over
   `tradeoff.latency_repeats` images, round-robin as well).
4. write tradeoff.csv / tradeoff.json / tradeoff.md, tradeoff.png (top-1 against throughput, the
   Pareto front drawn) and log them to W&B.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from data import build_data
from training import checkpoint as ckpt
from training.logger import benchmark_run
from training.report import markdown_table

log = logging.getLogger("tradeoff")
REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["model", "setting", "top1", "throughput_img_s", "latency_ms", "params", "train_steps", "train_cpu_s",
           "train_top1", "pareto", "run_dir"]


@dataclass
class Trained:
    """One trained model: its run dir and last checkpoint, the train.py config it was trained with,
    result.json and CPU-seconds."""

    key: str
    run_dir: Path
    checkpoint: Path
    config: dict
    result: dict
    cpu_s: float | None  # the train.py process tree's CPU time (None when reused)


def train_command(cfg: DictConfig, key: str, run_dir: Path, init: Path | None = None) -> list[str]:
    """The train.py command of model `key`; `init`: the last.pt it starts from (its init_from's)."""
    spec = cfg.tradeoff.models[key]
    return [sys.executable, str(REPO / "train.py"), f"model={spec.name}", f"data={cfg.tradeoff.data}",
            *cfg.tradeoff.train_overrides, *spec.get("overrides", []),
            *([f"model.pretrained={init}"] if init is not None else []),
            f"trainer.cpu_budget_s={cfg.tradeoff.cpu_budget_s}", f"seed={cfg.seed}", f"run_dir={run_dir}",
            f"logger.mode={cfg.logger.mode}", f"name=tradeoff_{key}"]


def run_training(cfg: DictConfig, key: str, run_dir: Path, init: Path | None = None) -> float:
    """Train one model with train.py (its log in run_dir/train_stdout.log); returns the CPU-seconds of
    the process and the children it waited for (data-loader workers), from wait4."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(cfg, key, run_dir, init)
    log.info("training %s: %s", key, " ".join(cmd[1:]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    with open(run_dir / "train_stdout.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = (run_dir / "train_stdout.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"training {key} failed (exit code {proc.returncode}); see {run_dir}/train_stdout.log:\n"
                           + "\n".join(tail))
    return usage.ru_utime + usage.ru_stime


def finished_run(key: str, run_dir: Path) -> Path:
    """The last.pt of a finished train.py run of model `key`, or a FileNotFoundError saying what is missing."""
    last = ckpt.find_last(run_dir)
    if not (run_dir / "result.json").is_file() or last is None:
        raise FileNotFoundError(f"{key}: {run_dir} is not a finished train.py run (needs result.json and "
                                f"checkpoints/{ckpt.LAST}); pass tradeoff.checkpoints.{key}=<train.py run dir>")
    return last


def load_trained(key: str, run_dir: Path, cpu_s: float | None) -> Trained:
    last = finished_run(key, run_dir)
    config = ckpt.load(last)["config"]  # weights-only, as every checkpoint read
    return Trained(key, run_dir, last, config, json.loads((run_dir / "result.json").read_text()), cpu_s)


def train_all(cfg: DictConfig, run_dir: Path) -> dict[str, Trained]:
    """Every model of tradeoff.models, trained here (tradeoff.jobs at a time) or reused."""
    tr = cfg.tradeoff
    reuse = {key: Path(d) for key, d in (tr.checkpoints or {}).items()}
    if tr.reuse:
        reuse = {**{key: Path(tr.reuse) / "train" / key for key in tr.models}, **reuse}
    unknown = set(reuse) - set(tr.models)
    if unknown:
        raise ValueError(f"tradeoff.checkpoints: unknown model key(s) {sorted(unknown)}; keys: {list(tr.models)}")
    where = {key: reuse.get(key, run_dir / "train" / key) for key in tr.models}
    to_train = training_order(tr.models, reuse)
    futures = {}

    def train(key: str) -> float:
        source, init = tr.models[key].get("init_from"), None
        if source is not None:
            if source in futures:
                futures[source].result()  # started earlier (training_order); raises if it failed
            init = finished_run(source, where[source])
        return run_training(cfg, key, where[key], init)

    with ThreadPoolExecutor(max_workers=max(1, int(tr.jobs))) as pool:
        for key in to_train:  # FIFO: a model's init_from is running or done before the model starts
            futures[key] = pool.submit(train, key)
        cpu = {key: future.result() for key, future in futures.items()}
    return {key: load_trained(key, where[key], cpu.get(key)) for key in tr.models}


def training_order(models: DictConfig, reuse: dict) -> list[str]:
    """The keys to train (not in `reuse`), each after the model it starts from (`init_from`), in the
    config's order otherwise; a ValueError for an unknown or circular init_from."""
    order: list[str] = []

    def visit(key: str, chain: tuple[str, ...]) -> None:
        if key in order or key in reuse:
            return
        if key in chain:
            raise ValueError(f"tradeoff.models: init_from forms a cycle: {' -> '.join((*chain, key))}")
        source = models[key].get("init_from")
        if source is not None:
            if source not in models:
                raise ValueError(f"tradeoff.models.{key}.init_from={source!r}: not a model key; keys: {list(models)}")
            visit(source, (*chain, key))
        order.append(key)

    for key in models:
        visit(key, ())
    return order


def build_trained_model(trained: Trained, **overrides) -> nn.Module:
    """The model of a train.py run with its last weights (not the EMA's); `overrides` are settings that
    are not weights (ToMe's tome_r)."""
    model_cfg = OmegaConf.create(trained.config["model"])
    model_cfg.pretrained = False
    model = hydra.utils.instantiate(model_cfg, **overrides)
    state = ckpt.load(trained.checkpoint)
    model.load_state_dict(state["model"])
    return model.eval()


def evaluation_images(data_cfg: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole evaluation set, normalised as train.py evaluates it: images (N, C, H, W), labels (N,)."""
    data = build_data(OmegaConf.create(data_cfg), 1, 0, seed, torch.device("cpu"))
    xs, ys = [], []
    for x, y, _ in data.val_loader:
        if x is not None:
            x, y = data.eval_transform(x, y)
            xs.append(x)
            ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@torch.inference_mode()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    correct = sum((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return 100 * correct / len(images)


@torch.inference_mode()
def time_side_by_side(models: dict[str, nn.Module], images: torch.Tensor, batch_size: int, repeats: int,
                      latency_repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (img/s at batch_size, batch-1 latency ms)}, medians; one warm-up pass each, then every
    model once per round (rounds cycle through the evaluation images)."""
    n_batches = max(1, len(images) // batch_size)
    for model in models.values():
        model(images[:batch_size])
        model(images[:1])
    batched: dict[str, list[float]] = {name: [] for name in models}
    single: dict[str, list[float]] = {name: [] for name in models}
    for r in range(repeats):
        x = images[(r % n_batches) * batch_size:][:batch_size]
        for name, model in models.items():
            t = time.perf_counter()
            model(x)
            batched[name].append(time.perf_counter() - t)
    for r in range(latency_repeats):
        x = images[r % len(images)][None]
        for name, model in models.items():
            t = time.perf_counter()
            model(x)
            single[name].append(time.perf_counter() - t)
    return {name: (len(images[:batch_size]) / statistics.median(batched[name]), 1e3 * statistics.median(single[name]))
            for name in models}


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both top-1 and throughput, fastest first."""
    front, best = [], -1.0
    for row in sorted(rows, key=lambda r: (-r["throughput_img_s"], -r["top1"])):
        if row["top1"] > best:
            front.append(row)
            best = row["top1"]
    return front


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """top-1 against throughput (log x), one point per model / setting, the Pareto front as a staircase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors: dict[str, str] = {}
    for row in rows:
        new = row["model"] not in colors
        c = colors.setdefault(row["model"], f"C{len(colors)}")
        ax.scatter(row["throughput_img_s"], row["top1"], color=c, label=row["model"] if new else None, zorder=3)
        text = row["setting"] if row["setting"].startswith("r=") else row["model"]  # ToMe points: their r
        ax.annotate(text, (row["throughput_img_s"], row["top1"]), fontsize=7, xytext=(3, 4), textcoords="offset points",
                    rotation=30 if text.startswith("r=") else 0)
    front = pareto_front(rows)  # fastest first: a staircase whose corners are below-left of the points
    ax.plot([r["throughput_img_s"] for r in front], [r["top1"] for r in front], "k--", lw=1, label="Pareto front",
            drawstyle="steps-post", zorder=2)  # (steps-pre put them above-right: accuracy nothing reached there)
    ax.legend(fontsize=8)
    ax.set(xscale="log", xlabel="inference throughput (img/s, log)", ylabel="top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(rows: list[dict]) -> str:
    fmt = {"top1": ".2f", "throughput_img_s": ".1f", "latency_ms": ".2f", "train_cpu_s": ".0f"}
    return markdown_table(rows, [(c, fmt.get(c, "")) for c in COLUMNS if c != "run_dir"])


def run_tradeoff(cfg: DictConfig, run_dir: Path, machine: dict) -> list[dict]:
    """The whole trade-off run into run_dir (module docstring); returns the rows."""
    tr = cfg.tradeoff
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    trained = train_all(cfg, run_dir)
    data_cfgs = {key: t.config["data"] for key, t in trained.items()}
    first = next(iter(data_cfgs.values()))
    differ = [key for key, d in data_cfgs.items() if d != first]
    if differ:
        raise ValueError(f"tradeoff: {differ} were trained on other data than {next(iter(data_cfgs))}; "
                         "every model of one chart must share the data config")
    images, labels = evaluation_images(first, cfg.seed)
    settings: dict[str, tuple[str, str, nn.Module, Trained]] = {}  # label -> (model key, setting, model, run)
    for key, t in trained.items():
        settings[f"{key} {t.config['model']['name']}"] = (key, t.config["model"]["name"], build_trained_model(t), t)
    if tr.tome.model:
        if tr.tome.model not in trained:
            raise ValueError(f"tradeoff.tome.model={tr.tome.model!r} is not among tradeoff.models {list(trained)}")
        for r in tr.tome.r:
            t = trained[tr.tome.model]
            settings[f"{tr.tome.model} tome_r={r}"] = (f"{tr.tome.model}+ToMe", f"r={r}",
                                                       build_trained_model(t, tome_r=int(r)), t)
    timings = time_side_by_side({label: s[2] for label, s in settings.items()}, images, int(tr.batch_size),
                                int(tr.repeats), int(tr.latency_repeats))
    rows = []
    for label, (key, setting, model, t) in settings.items():
        throughput, latency = timings[label]
        rows.append(dict(model=key, setting=setting, top1=top1(model, images, labels, int(tr.batch_size)),
                         throughput_img_s=throughput, latency_ms=latency,
                         params=sum(p.numel() for p in model.parameters()), train_steps=t.result.get("step"),
                         train_cpu_s=t.cpu_s, train_top1=t.result.get("top1"), pareto=False, run_dir=str(t.run_dir)))
    front = pareto_front(rows)
    for row in rows:
        row["pareto"] = any(row is f for f in front)
    meta = {**machine, "cpu_budget_s": tr.cpu_budget_s, "eval_images": len(images),
            "seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads()}
    with (run_dir / "tradeoff.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "tradeoff.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    header = (f"{meta['cpu']} ({meta['cpu_count']} cores, {meta['torch_threads']} torch threads for the timings), "
              f"torch {meta['torch']}, {meta['date_utc']} UTC; training budget {tr.cpu_budget_s} CPU-s per model; "
              f"top-1 on {len(images)} evaluation images; throughput at batch {tr.batch_size} (median of "
              f"{tr.repeats}), latency at batch 1 (median of {tr.latency_repeats}); run took {meta['seconds']} s")
    table = header + "\n\n" + format_table(rows)
    (run_dir / "tradeoff.md").write_text(table + "\n")
    png = plot(rows, run_dir / "tradeoff.png", f"{tr.data}: top-1 vs throughput, {tr.cpu_budget_s} CPU-s each")
    print(table)
    log_wandb(cfg, rows, png, meta, run_dir)
    print(f"trade-off written to {run_dir}/tradeoff.csv, tradeoff.md and tradeoff.png")
    return rows


def log_wandb(cfg: DictConfig, rows: list[dict], png: Path, meta: dict, run_dir: Path) -> None:
    run = benchmark_run(cfg, run_dir, f"tradeoff_{run_dir.name}", meta, extra_tags=("tradeoff",))
    if run is None:
        return
    import wandb

    try:
        table = wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])
        run.log({"tradeoff/table": table, "tradeoff/plot": wandb.Image(str(png)),
                 "tradeoff/scatter": wandb.plot.scatter(table, "throughput_img_s", "top1",
                                                        title="top-1 vs throughput (img/s)")})
    finally:
        run.finish()


def replot(csv_path: Path, png: Path, title: str) -> Path:
    """Draw `plot` again from a run's tradeoff.csv (no training, no timing)."""
    with Path(csv_path).open() as f:
        rows = [{**r, "top1": float(r["top1"]), "throughput_img_s": float(r["throughput_img_s"])}
                for r in csv.DictReader(f)]
    return plot(rows, Path(png), title)


if __name__ == "__main__":  # python -m training.tradeoff <tradeoff.csv> <out.png> "<title>"
    import argparse

    parser = argparse.ArgumentParser(description="redraw a trade-off run's chart from its tradeoff.csv")
    parser.add_argument("csv", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("title")
    args = parser.parse_args()
    print(replot(args.csv, args.png, args.title))
