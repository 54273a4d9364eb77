"""Weights & Biases on rank 0 (offline by default; `wandb sync` uploads later) and a plain
metrics.jsonl in the run directory that any script can read back."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf


def benchmark_run(cfg, run_dir: Path, name: str, meta: dict, extra_tags: tuple[str, ...] = ()):
    """A W&B run for a benchmark.py result (job_type benchmark, the machine in its config), files under
    run_dir/wandb; None when cfg.logger.mode is disabled. The caller logs into it and finishes it."""
    if cfg.logger.mode == "disabled":
        return None
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
        tags=[*cfg.logger.tags, *extra_tags], mode=cfg.logger.mode, dir=str(run_dir), name=name,
        job_type="benchmark", config={**OmegaConf.to_container(cfg, resolve=True), "machine": meta},
    )  # fmt: skip


def evaluations(metrics_file: Path) -> list[list[float]]:
    """[img_s, top1, top1_ema (or top1), step] of each evaluation metrics.jsonl holds (val/img_s and
    val/top1 lines), one per step (a redone step: its last line), in step order."""
    by_step = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if "val/img_s" in m and "val/top1" in m:
                by_step[m["step"]] = [m["val/img_s"], m["val/top1"], m.get("val_ema/top1", m["val/top1"]), m["step"]]
    return [by_step[s] for s in sorted(by_step)]


class Logger:
    """Rank 0's metrics: metrics.jsonl always; W&B unless logger.mode=disabled (which needs no wandb
    installed, e.g. on a machine whose python has only the model's packages)."""

    def __init__(self, cfg, run_dir: Path, enabled: bool, run_id: str | None = None):
        self.enabled, self.run, self.run_dir = enabled, None, Path(run_dir)
        self._acc_vs_speed: list[list[float]] = []
        if not enabled:
            return
        self._acc_vs_speed = evaluations(self.run_dir / "metrics.jsonl")  # a resumed run's scatter keeps them
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        if cfg.logger.mode == "disabled":
            return
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            dir=str(run_dir), mode=cfg.logger.mode, project=cfg.logger.project, entity=cfg.logger.entity,
            group=cfg.logger.group, tags=list(cfg.logger.tags), name=cfg.name or self.run_dir.name,
            config=OmegaConf.to_container(cfg, resolve=True), id=run_id, resume="allow" if run_id else None,
        )
        # accuracy against measured throughput: a chart whose x-axis is img/s (the paper's Fig. 1 axis)
        self.run.define_metric("throughput/eval_img_s")
        for key in ("throughput/top1", "throughput/top1_ema"):
            self.run.define_metric(key, step_metric="throughput/eval_img_s")

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.run is not None:
            self.run.log(metrics, step=step)
        plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.metrics_file.write(json.dumps({"step": step, **plain}) + "\n")
        self.metrics_file.flush()

    def log_accuracy_vs_throughput(self, img_s: float, top1: float, top1_ema: float | None, step: int) -> None:
        """Both the define_metric chart above and a scatter of every evaluation so far."""
        if self.run is None:
            return
        # a step at or before an earlier point's is a resumed run redoing it: the redo replaces what follows
        self._acc_vs_speed = [p for p in self._acc_vs_speed if p[3] < step]
        self._acc_vs_speed.append([img_s, top1, top1 if top1_ema is None else top1_ema, step])
        table = self.wandb.Table(data=self._acc_vs_speed, columns=["img_s", "top1", "top1_ema", "step"])
        metrics = {"throughput/eval_img_s": img_s, "throughput/top1": top1,
                   "charts/top1_vs_img_s": self.wandb.plot.scatter(table, "img_s", "top1",
                                                                   title="val top-1 vs eval throughput (img/s)")}
        if top1_ema is not None:
            metrics["throughput/top1_ema"] = top1_ema
        self.run.log(metrics, step=step)

    def log_image(self, key: str, array, caption: str, step: int) -> None:
        if self.run is not None:
            self.run.log({key: self.wandb.Image(array, caption=caption)}, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)
            self.run.config.update(values, allow_val_change=True)

    def finish(self) -> None:
        if self.enabled:
            self.metrics_file.close()
        if self.run is not None:
            self.run.finish()
