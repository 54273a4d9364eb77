"""train.py end to end on the CPU, in-process: the default data path with tiny sizes, W&B read
back from the offline run, eval-only (ours and the authors' weights), the RoI drawing command,
and the ImageNet path with a corrupt file."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import train as train_script
from train_helpers import CONF, FAST, TINY_MNIST, TINY_MODEL, compose_cfg, make_fake_imagenet
from wandb_offline import find_run_files, read_run

# the architecture of ../shared/fixtures/official_v{1,2}_small.pt on top of sparseformer_t
FIXTURE_MODEL = ["+model.num_tokens=16", "+model.num_points=16", "+model.focusing_dim=64", "+model.cortex_dim=128",
                 "+model.cortex_depth=2", "+model.backend=torch"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """8 steps (2 epochs of 4) of tiny SparseFormer-nano on tiny cluttered MNIST."""
    run_dir = tmp_path_factory.mktemp("mnist_run")
    cfg = compose_cfg([*TINY_MODEL, *TINY_MNIST, *FAST, f"run_dir={run_dir}", "trainer.ckpt_every_steps=3"])
    top1 = train_script.train(cfg, run_dir)
    return run_dir, cfg, top1


def test_default_path_trains_and_checkpoints(mnist_run):
    run_dir, cfg, top1 = mnist_run
    assert 0.0 <= top1 <= 100.0
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)  # tensors and plain values only
    assert state["step"] == 8 and state["epoch"] == 2 and state["batch_in_epoch"] == 0
    assert set(state) == {"model", "ema", "optimizer", "scaler", "schedule", "step", "epoch", "batch_in_epoch", "rng",
                          "wandb_id", "config", "cpu_seconds", "evaluated_epoch"}  # training/checkpoint.py's layout
    assert state["schedule"]["total_steps"] == 8 and state["schedule"]["warmup_steps"] == 2
    assert state["wandb_id"] and state["config"]["model"]["name"] == "sparseformer_nano"
    assert not list((run_dir / "checkpoints").glob(".*tmp*"))  # atomic writes leave no temp files
    losses = [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    evals = [m for m in read_metrics(run_dir) if "val/top1" in m]
    assert len(evals) == 2  # each epoch
    # the schedule: linear warm-up over 2 steps (0.5 epoch), then cosine down to min_lr at step 8
    lrs = [m["train/lr"] for m in read_metrics(run_dir) if "train/lr" in m]
    assert lrs[0] == pytest.approx(cfg.schedule.warmup_lr) and lrs[2] == pytest.approx(cfg.optim.lr)
    assert lrs[2] > lrs[4] > lrs[7] > cfg.schedule.min_lr
    result = json.loads((run_dir / "result.json").read_text())  # the final numbers, for scripts
    assert result["top1"] == top1 and result["step"] == 8 and result["world_size"] == 1 and result["wall_s"] > 0


def test_optimizer_is_fused_adamw_with_no_decay_groups():
    from training.optim import build_optimizer

    cfg = compose_cfg([*TINY_MODEL, *TINY_MNIST, *FAST])
    m = hydra.utils.instantiate(cfg.model, num_classes=10, in_chans=1)
    opt = build_optimizer(m, cfg.optim, 1e-3)
    assert opt.defaults["fused"] is True  # one kernel per step on CPU/CUDA
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert m.token_roi in no_decay["params"] and all(p.ndim > 1 for p in decay["params"])


def test_a_peak_lr_below_min_lr_is_a_warning(caplog):
    """The default recipe scales lr 5e-4 per 512 clips: a batch of 4 gives 3.9e-6 < min_lr 1e-5, and the
    cosine climbs for the whole run (a debugging run may not care; a real one should know)."""
    cfg = compose_cfg(["data=kinetics", "data.batch_size=4"])
    with caplog.at_level("WARNING"):
        assert train_script.lr_schedule(cfg, steps_per_epoch=10, world_size=1)["base_lr"] == pytest.approx(3.90625e-6)
    assert "peak lr 3.91e-06 (optim.base_lr=0.0005 x global batch 4 / optim.base_batch_size=512) is below " \
           "schedule.min_lr=1e-05" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # another rank: the same schedule, no second line
        assert train_script.lr_schedule(cfg, steps_per_epoch=10, world_size=1, warn=False)["base_lr"] == \
            pytest.approx(3.90625e-6)
    assert "peak lr" not in caplog.text
    cfg.schedule.min_lr = 0.0
    with caplog.at_level("WARNING"):
        train_script.lr_schedule(cfg, steps_per_epoch=10, world_size=1)
    assert "peak lr" not in caplog.text


def test_wandb_offline_run_reads_back(mnist_run):
    run_dir, cfg, top1 = mnist_run
    files = find_run_files(run_dir)
    assert len(files) == 1
    run = read_run(files[0])
    assert run["config"]["model"]["name"] == "sparseformer_nano"
    assert run["config"]["model"]["num_classes"] == 10 and run["config"]["model"]["in_chans"] == 1
    assert run["config"]["data"]["batch_size"] == 8 and run["config"]["logger"]["mode"] == "offline"
    assert run["summary"]["params"] > 0 and run["summary"]["gmacs"] > run["summary"]["gmacs_without_mixing"] > 0
    hist = run["history"]
    by_step = {}
    for row in hist:
        by_step.setdefault(row["_step"], {}).update(row)
    logged_losses = [by_step[s]["train/loss"] for s in range(1, 9)]
    assert logged_losses == [m["train/loss"] for m in read_metrics(run_dir) if "train/loss" in m]
    assert all(by_step[s]["train/img_s"] > 0 for s in range(1, 9))
    assert all("train/lr" in by_step[s] for s in range(1, 9))
    final = by_step[8]
    for key in ("val/top1", "val/top5", "val_ema/top1", "val_ema/top5", "throughput/eval_img_s", "throughput/top1"):
        assert key in final, key
    assert final["val/top1"] == pytest.approx(top1)
    assert final["val/top5"] >= final["val/top1"]
    # accuracy against measured img/s: a chart keyed on throughput, and a scatter table
    assert run["metrics"]["throughput/top1"] == "throughput/eval_img_s"
    assert final["charts/top1_vs_img_s_table._type"] == "table-file"
    table = json.loads((files[0].parent / "files" / final["charts/top1_vs_img_s_table.path"]).read_text())
    assert table["columns"][:2] == ["img_s", "top1"] and len(table["data"]) == 2
    # RoI drawings of validation images, each epoch
    assert final["val/rois._type"] == "image-file"
    png = files[0].parent / "files" / final["val/rois.path"]
    img = np.asarray(Image.open(png))
    assert img.shape[0] > 100 and img.std() > 10  # a real drawing, not a blank canvas


def test_logger_disabled_needs_no_wandb(tmp_path, monkeypatch):
    """logger.mode=disabled trains with wandb not importable (a GPU machine's own python has none)
    and still writes metrics.jsonl; W&B writes nothing."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = compose_cfg([*TINY_MODEL, *TINY_MNIST, *FAST, f"run_dir={tmp_path}", "trainer.epochs=1",
                       "logger.mode=disabled"])
    top1 = train_script.train(cfg, tmp_path)
    assert 0.0 <= top1 <= 100.0
    metrics = read_metrics(tmp_path)
    assert sum("train/loss" in m for m in metrics) == 4 and sum("val/top1" in m for m in metrics) == 1
    assert not find_run_files(tmp_path) and not (tmp_path / "wandb").exists()


def test_soft_target_cross_entropy():
    target = torch.tensor([[0.92, 0.02, 0.02, 0.02, 0.02]])
    loss = train_script.soft_target_cross_entropy(torch.zeros(1, 5), target)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(5.0)).item())  # uniform logits: log K
    logits = torch.randn(4, 5)
    hard = torch.nn.functional.one_hot(torch.arange(4), 5).float()
    torch.testing.assert_close(train_script.soft_target_cross_entropy(logits, hard),
                               torch.nn.functional.cross_entropy(logits, torch.arange(4)))


@pytest.mark.parametrize("how", ["resume", "pretrained"])
def test_eval_only_reproduces_the_final_evaluation(mnist_run, tmp_path, how, caplog):
    """trainer.resume restores the whole TrainState (its step, the EMA); model.pretrained takes the
    checkpoint's raw weights: both give the run's final top-1. The command names the run's own model:
    no line about evaluating another one."""
    run_dir, _, top1 = mnist_run
    last = run_dir / "checkpoints" / "last.pt"
    source = f"trainer.resume={last}" if how == "resume" else f"model.pretrained={last}"
    cfg = compose_cfg([*TINY_MODEL, *TINY_MNIST, *FAST, f"run_dir={tmp_path}", "trainer.eval_only=true", source,
                       "logger.mode=disabled"])
    with caplog.at_level("INFO", logger="train"):
        assert train_script.train(cfg, tmp_path) == pytest.approx(top1)
    assert "evaluating the model stored in" not in caplog.text
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == (8 if how == "resume" else 0)
    if how == "resume":  # the checkpoint's EMA, not a fresh copy of the raw weights
        assert result["top1_ema"] == pytest.approx(json.loads((run_dir / "result.json").read_text())["top1_ema"])


def test_eval_only_builds_the_model_stored_in_the_checkpoint(mnist_run, tmp_path, caplog, monkeypatch):
    """The command line names the default nano (other widths): eval-only evaluates the checkpoint's own
    model and reports the checkpoint's step, reading the file once (its model config and its state)."""
    import training.checkpoint

    run_dir, _, top1 = mnist_run
    last = run_dir / "checkpoints" / "last.pt"
    reads = []
    for module in (train_script, training.checkpoint):
        real = module.read_checkpoint
        monkeypatch.setattr(module, "read_checkpoint", lambda path, real=real: reads.append(Path(path)) or real(path))
    cfg = compose_cfg([*TINY_MNIST, *FAST, f"run_dir={tmp_path}", "trainer.eval_only=true", "logger.mode=disabled",
                       f"trainer.resume={last}"])
    with caplog.at_level("INFO", logger="train"):
        assert train_script.train(cfg, tmp_path) == pytest.approx(top1)
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 8
    assert "evaluating the model stored in" in caplog.text
    assert reads == [last]


def test_fine_tuning_starts_from_the_given_weights(mnist_run, tmp_path, monkeypatch):
    """model.pretrained=<our last.pt>: training starts from its raw weights (then trains)."""
    run_dir, _, _ = mnist_run
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    at_start = []
    real_instantiate = hydra.utils.instantiate

    def spy(*args, **kwargs):
        m = real_instantiate(*args, **kwargs)
        at_start.append({k: v.clone() for k, v in m.state_dict().items()})
        return m

    monkeypatch.setattr(train_script.hydra.utils, "instantiate", spy)
    cfg = compose_cfg([*TINY_MODEL, *TINY_MNIST, *FAST, "trainer.epochs=1", "logger.mode=disabled",
                       "logger.num_roi_images=0", f"model.pretrained={run_dir / 'checkpoints' / 'last.pt'}",
                       f"run_dir={tmp_path}"])
    train_script.train(cfg, tmp_path)
    (start,) = at_start
    assert all(torch.equal(start[k], v) for k, v in saved.items())
    trained = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert trained["step"] == 4 and not torch.equal(trained["model"]["token_roi"], saved["token_roi"])


def test_visualize_draws_every_sampling_step(mnist_run, tmp_path):
    import visualize

    run_dir, _, _ = mnist_run
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="visualize", overrides=[f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
                                                          "num_images=3", f"out={tmp_path / 'rois.png'}"])
    (out,) = visualize.visualize(cfg)
    img = Image.open(out)
    # 3 rows (images) x 2 columns (2 focusing repeats + the cortex's sampling step = 3 steps)
    assert img.width > img.height * 0.8 and np.asarray(img).std() > 10


@pytest.mark.parametrize("name", ["official_v1_small.pt", "official_v2_small.pt"])
def test_released_weights_fine_tune_and_evaluate(fixtures_dir, tmp_path, monkeypatch, caplog, name):
    """model.pretrained=<the authors' file> (either layout, detected) on a 2-class ImageNet folder:
    the 1000-class head is re-initialised (one log line), every other weight is the file's."""
    built = []
    real_instantiate = hydra.utils.instantiate
    monkeypatch.setattr(train_script.hydra.utils, "instantiate", lambda *a, **k: built.append(real_instantiate(*a, **k))
                        or built[-1])
    root = make_fake_imagenet(tmp_path / "imagenet")
    cfg = compose_cfg(["model=sparseformer_t", *FIXTURE_MODEL, f"model.pretrained={fixtures_dir / name}",
                       "data=imagenet", f"data.root={root}", "data.image_size=64", "data.num_workers=0",
                       "data.eval_batch_size=2", "hardware=cpu", "logger.mode=disabled", "trainer.eval_only=true",
                       "trainer.ema_decay=null", f"run_dir={tmp_path / 'run'}"])
    with caplog.at_level("INFO"):
        assert 0.0 <= train_script.train(cfg, tmp_path / "run") <= 100.0
    assert "the checkpoint has 1000 classes, the model 2: head.classifier re-initialised" in caplog.text
    (model,) = built
    ref = torch.load(fixtures_dir / "official_v1_small.pt", weights_only=True)["state_dict"]
    assert model.head.classifier.out_features == 2
    assert torch.equal(model.stem.conv1.weight, ref["feat_extractor.conv1.weight"])
    assert torch.equal(model.cortex[0].adaptive_mixing.out_proj.weight, ref["layers.2.adaptive_mixing.tuo_proj.weight"])


def test_imagenet_path_skips_and_counts_the_corrupt_file(tmp_path, caplog):
    root = make_fake_imagenet(tmp_path / "imagenet")
    run_dir = tmp_path / "run"
    cfg = compose_cfg(["data=imagenet", f"data.root={root}", "data.image_size=32", "data.batch_size=3",
                       "data.eval_batch_size=4", "data.num_workers=0", "data.augment.repeats=1", *TINY_MODEL,
                       *FAST, "trainer.epochs=2", f"run_dir={run_dir}", "logger.num_roi_images=0"])
    with caplog.at_level("WARNING"):  # 2 epochs: the broken file is counted once, not once per epoch
        train_script.train(cfg, run_dir)
    metrics = read_metrics(run_dir)
    assert [m for m in metrics if "val/top1" in m][-1]["val/skipped_files"] == 1
    assert [m for m in metrics if "train/skipped_files" in m][-1]["train/skipped_files"] == 1
    assert "broken.JPEG" in caplog.text
    assert "undecodable training files: 1 reads skipped in the epoch with the most" in caplog.text


def test_eval_throughput_is_the_forward_not_the_loader():
    """The accuracy-vs-throughput axis (`img_s`) times the model's forward only; a slow loader (JPEG
    decoding on a GPU machine) shows in `img_s_wall`, not in it."""
    import time

    import train as train_script
    from training.dist import DistInfo

    def slow_loader():
        for _ in range(3):
            time.sleep(0.2)  # a loader that takes far longer than the forward
            yield torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), 0

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    res = train_script.evaluate(model, slow_loader(), lambda x, y: (x.float(), y), DistInfo(), "fp32")
    assert res["n"] == 24 and res["img_s_wall"] < 24 / 0.6
    assert res["img_s"] > 10 * res["img_s_wall"]


def test_img_s_leaves_out_checkpoint_writes(tmp_path, monkeypatch):
    """train/img_s is the training rate: a checkpoint written inside a log window (here every step,
    each write made 1 s slow) is not in it."""
    import time

    from training.checkpoint import TrainState

    real_save = TrainState.save
    monkeypatch.setattr(TrainState, "save", lambda self, *a: (real_save(self, *a), time.sleep(1.0))[0])
    cfg = compose_cfg([*TINY_MODEL, *TINY_MNIST, *FAST, f"run_dir={tmp_path}", "trainer.epochs=1",
                       "trainer.ckpt_every_steps=1", "logger.mode=disabled", "logger.num_roi_images=0"])
    train_script.train(cfg, tmp_path)
    rates = [m["train/img_s"] for m in read_metrics(tmp_path) if "train/img_s" in m]
    assert len(rates) == 4 and min(rates) > 16  # batch 8: a window with a 1 s write in it would read < 8


def test_a_resumed_runs_accuracy_vs_throughput_scatter_keeps_the_earlier_evaluations(tmp_path):
    """The W&B scatter of top-1 against eval img/s is rebuilt from metrics.jsonl on resume (it lived in
    memory only); a step the resumed run redoes replaces the killed run's point and those after it."""
    from training.logger import Logger, evaluations

    lines = [{"step": 4, "val/top1": 20.0, "val/img_s": 100.0, "val_ema/top1": 15.0},
             {"step": 4, "train/loss": 2.0},
             {"step": 8, "val/top1": 30.0, "val/img_s": 110.0},  # no EMA: its top-1 stands in
             {"step": 12, "val/top1": 35.0, "val/img_s": 90.0}]  # after the last checkpoint: redone
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"step": 16, "val/to')
    assert evaluations(tmp_path / "metrics.jsonl") == [[100.0, 20.0, 15.0, 4], [110.0, 30.0, 30.0, 8],
                                                       [90.0, 35.0, 35.0, 12]]
    cfg = compose_cfg([*FAST, f"run_dir={tmp_path}", "logger.mode=offline"])
    logger = Logger(cfg, tmp_path, enabled=True)
    try:
        logger.log_accuracy_vs_throughput(95.0, 36.0, None, step=12)
        assert logger._acc_vs_speed == [[100.0, 20.0, 15.0, 4], [110.0, 30.0, 30.0, 8], [95.0, 36.0, 36.0, 12]]
    finally:
        logger.finish()
