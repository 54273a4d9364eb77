"""benchmark.py mode=tradeoff end to end on tiny models and data (every model trained by train.py on a
CPU-time budget, ToMe settings, side-by-side timings, CSV / PNG / W&B), its reuse of earlier runs,
and the Pareto front."""
import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import benchmark
from training import checkpoint as ckpt
from training import tradeoff
from training.tradeoff import pareto_front, training_order

CONF = str(Path(benchmark.__file__).resolve().parent / "conf")
TINY_DATA = ["data.batch_size=8", "data.eval_batch_size=16", "data.train_samples_per_epoch=32",
             "data.test_samples=24", "data.canvas_size=40", "data.num_clutter=2", "data.num_workers=0"]
TINY_VIT = ["+model.embed_dim=32", "+model.depth=2", "+model.num_heads=2"]
EPOCHS = 1000  # more than any tiny model trains in the 1.5 CPU-s budget


def smoke_config(tmp_path, **extra):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="benchmark", overrides=["mode=tradeoff", "device=cpu", "logger.mode=offline"])
    tr = cfg.tradeoff
    tr.cpu_budget_s, tr.repeats, tr.latency_repeats, tr.batch_size = 1.5, 2, 2, 8
    tr.train_overrides = [*tr.train_overrides, *TINY_DATA, f"trainer.epochs={EPOCHS}", "logger.log_every_steps=1"]
    tr.models = {
        "sparseformer_nano": {"name": "sparseformer_nano", "overrides": [
            "+model.num_tokens=4", "+model.num_points=4", "+model.conv_dim=8", "+model.focusing_dim=16",
            "+model.cortex_dim=32", "+model.cortex_depth=1", "+model.num_heads=2", "+model.focusing_repeats=2"]},
        "deit": {"name": "deit_tiny", "overrides": TINY_VIT},
        "avit": {"name": "avit_tiny", "overrides": TINY_VIT, "init_from": "deit"},
        "cnn": {"name": "cnn_small", "overrides": ["+model.widths=[4,8]"]},
    }
    tr.tome.r = [2, 4]
    for k, v in extra.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tradeoff_trains_on_one_budget_and_writes_chart(tmp_path):
    run_dir = tmp_path / "run"
    rows = benchmark.run(smoke_config(tmp_path), run_dir)
    settings = [(r["model"], r["setting"]) for r in rows]
    assert settings == [("sparseformer_nano", "sparseformer_nano"), ("deit", "deit_tiny"), ("avit", "avit_tiny"),
                        ("cnn", "cnn_small"), ("deit+ToMe", "r=2"), ("deit+ToMe", "r=4")]
    for key in ("sparseformer_nano", "deit", "avit", "cnn"):
        result = json.loads((run_dir / "train" / key / "result.json").read_text())
        # the budget stopped the run, not the epochs (4 steps each; one tiny model ran all of 50 inside the budget once)
        assert 1 <= result["step"] < EPOCHS * 4
    for r in rows:
        assert 0 <= r["top1"] <= 100 and r["throughput_img_s"] > 0 and r["latency_ms"] > 0
        assert r["train_cpu_s"] > 1.5  # the process tree used at least the training budget
    # A-ViT started from the DeiT's trained weights, as the default config has it
    avit_config = ckpt.load(ckpt.find_last(run_dir / "train" / "avit"))["config"]
    assert avit_config["model"]["pretrained"] == str(ckpt.find_last(run_dir / "train" / "deit"))
    assert "loaded pretrained weights" in (run_dir / "train" / "avit" / "train_stdout.log").read_text()
    deit = next(r for r in rows if r["model"] == "deit")
    assert all(r["params"] == deit["params"] for r in rows if r["model"] == "deit+ToMe")  # a setting, same weights
    on_csv = read_csv(run_dir / "tradeoff.csv")
    assert {"model", "setting", "top1", "throughput_img_s"} <= set(on_csv[0]) and len(on_csv) == len(rows)
    assert any(r["pareto"] == "True" for r in on_csv)
    assert (run_dir / "tradeoff.png").stat().st_size > 10_000
    assert "| model | setting | top1 |" in (run_dir / "tradeoff.md").read_text()
    assert list((run_dir / "wandb").glob("offline-run-*"))

    # redraw from the trained runs: nothing is trained again and the accuracies are the same
    again = benchmark.run(smoke_config(tmp_path, **{"tradeoff.reuse": str(run_dir), "logger.mode": "disabled"}),
                          tmp_path / "redraw")
    assert not (tmp_path / "redraw" / "train").exists()
    assert [(r["model"], r["setting"], r["top1"]) for r in again] == [(r["model"], r["setting"], r["top1"])
                                                                      for r in rows]
    assert all(r["train_cpu_s"] is None for r in again)


def test_tradeoff_rejects_unknown_checkpoint_key(tmp_path):
    cfg = smoke_config(tmp_path, **{"tradeoff.checkpoints": {"vit": str(tmp_path)}})
    with pytest.raises(ValueError, match="unknown model key.*vit"):
        benchmark.run(cfg, tmp_path / "run")


def test_tradeoff_reports_a_run_that_is_not_finished(tmp_path):
    cfg = smoke_config(tmp_path, **{"tradeoff.checkpoints": {k: str(tmp_path) for k in
                                                             ("sparseformer_nano", "deit", "avit", "cnn")}})
    with pytest.raises(FileNotFoundError, match="not a finished train.py run"):
        benchmark.run(cfg, tmp_path / "run")


def test_pareto_front_by_hand():
    rows = [dict(top1=90, throughput_img_s=10), dict(top1=80, throughput_img_s=100), dict(top1=85, throughput_img_s=5),
            dict(top1=95, throughput_img_s=1), dict(top1=70, throughput_img_s=50)]
    front = pareto_front(rows)
    assert [(r["top1"], r["throughput_img_s"]) for r in front] == [(80, 100), (90, 10), (95, 1)]


def test_the_drawn_front_never_passes_above_right_of_the_points(tmp_path, monkeypatch):
    """Every corner of the plotted staircase is reached by some measured point (at least as fast and as
    accurate): the line claims no accuracy that no model has at that speed."""
    import matplotlib.axes

    rows = [dict(model=m, setting="", throughput_img_s=x, top1=y)
            for m, x, y in (("a", 1600.0, 76.9), ("b", 890.0, 82.4), ("c", 300.0, 94.9), ("d", 500.0, 70.0))]
    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        lines = real_plot(self, *args, **kwargs)
        if kwargs.get("label") == "Pareto front":
            drawn.append(lines[0].get_path().vertices)  # data coordinates, the steps included
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    tradeoff.plot(rows, tmp_path / "t.png", "title")
    corners = drawn[0]
    assert len(corners) > 3  # a staircase, not the 3 points joined
    for x, y in corners:
        assert any(r["throughput_img_s"] >= x - 1e-9 and r["top1"] >= y - 1e-9 for r in rows), (x, y)


def test_training_order_puts_init_from_first_and_rejects_bad_ones():
    models = OmegaConf.create({"a": {"name": "x", "init_from": "c"}, "b": {"name": "y"}, "c": {"name": "z"}})
    assert training_order(models, {}) == ["c", "a", "b"]
    assert training_order(models, {"c": Path("/reused")}) == ["a", "b"]  # a reused source is not trained
    with pytest.raises(ValueError, match="init_from='d': not a model key"):
        training_order(OmegaConf.create({"a": {"name": "x", "init_from": "d"}}), {})
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        cycle = {"a": {"name": "x", "init_from": "b"}, "b": {"name": "y", "init_from": "a"}}
        training_order(OmegaConf.create(cycle), {})
