"""train.py on clips: the embedded moving-digits task and a tiny Kinetics folder (PyAV-written mp4s,
one corrupt), with multi-view evaluation; W&B gets the tubes figure."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import train as train_script
import visualize
from data import average_view_probs, fold_views
from model import count_flops, create_model
from test_data_kinetics import write_video
from train_helpers import CONF, FAST, TINY_MODEL, compose_cfg
from wandb_offline import find_run_files, read_run

TINY_CLIPS = ["data.batch_size=8", "data.eval_batch_size=8", "data.train_samples_per_epoch=16", "data.test_samples=8",
              "data.num_frames=4", "data.canvas_size=40", "data.speed=[2,2]", "data.num_workers=0"]


def test_moving_digits_trains_and_evaluates(tmp_path):
    cfg = compose_cfg(["data=moving_digits", "model=videosparseformer_nano", *TINY_MODEL, "+model.replicates=2", *FAST,
                       *TINY_CLIPS, f"run_dir={tmp_path}"])
    top1 = train_script.train(cfg, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["top1"] == top1 and result["step"] == 4 and 0 <= top1 <= 100
    assert 0 <= result["top5"] <= 100 and "top5_ema" in result
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["model"]["token_roi"].shape == (4 * 2, 6)  # tubes
    # the logged GMACs are per clip of the data's 4 frames (the stem runs on every frame: 8 would count more)
    model = create_model("videosparseformer_nano",
                         **{k: v for k, v in state["config"]["model"].items() if k not in ("_target_", "name")})
    summary = read_run(find_run_files(tmp_path)[0])["summary"]
    assert summary["gmacs"] == pytest.approx(count_flops(model, 40, in_chans=1, num_frames=4)["macs"] / 1e9)
    assert summary["gmacs"] < count_flops(model, 40, in_chans=1, num_frames=8)["macs"] / 1e9
    # visualize.py on the video checkpoint: one PNG per clip, a row per sampling step, a column per frame
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        vis = compose(config_name="visualize", overrides=[f"checkpoint={tmp_path / 'checkpoints' / 'last.pt'}",
                                                          "num_images=2", f"out={tmp_path / 'tubes.png'}"])
    paths = visualize.visualize(vis)
    assert [p.name for p in paths] == ["tubes_clip0.png", "tubes_clip1.png"]
    img = np.asarray(Image.open(paths[0]))
    assert img.shape[1] > img.shape[0] and img.std() > 10  # 4 frames wide
    # the command line's data keys apply over the checkpoint's data config; another kind of dataset is refused
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = [f"checkpoint={tmp_path / 'checkpoints' / 'last.pt'}", "num_images=1", "data=moving_digits",
                     "data.num_frames=2", f"out={tmp_path / 'two.png'}"]  # (canvas_size etc.: the run's own)
        two = visualize.visualize(compose(config_name="visualize", overrides=overrides), overrides)
        assert np.asarray(Image.open(two[0])).shape[1] < img.shape[1]  # 2 frames wide
        overrides = [f"checkpoint={tmp_path / 'checkpoints' / 'last.pt'}", "data=cluttered_mnist"]
        with pytest.raises(visualize.ConfigError, match="data=cluttered_mnist yields images but the checkpoint's "
                                                        "VideoSparseFormer takes clips"):
            visualize.visualize(compose(config_name="visualize", overrides=overrides), overrides)


def test_frame_blind_baseline_trains_on_the_same_task(tmp_path):
    cfg = compose_cfg(["data=moving_digits", "model=framewise_sparseformer_nano", *FAST, *TINY_CLIPS,
                       "logger.num_roi_images=0", "logger.mode=disabled", f"run_dir={tmp_path}"])
    assert 0 <= train_script.train(cfg, tmp_path) <= 100


def test_multi_view_evaluation_averages_the_views():
    """A model that scores each view by its mean pixel: the clip's score is the views' mean probability."""
    x = torch.arange(2 * 3, dtype=torch.float32).view(2, 3, 1, 1, 1, 1).expand(2, 3, 1, 2, 4, 4)

    def model(clips):
        return torch.stack([clips.mean((1, 2, 3, 4)), -clips.mean((1, 2, 3, 4))], dim=1)

    logits = train_script.view_averaged(model, x, 3)
    views = torch.tensor([[0.0, 1, 2], [3, 4, 5]])  # each view's mean pixel
    torch.testing.assert_close(logits, torch.stack([views, -views], -1).softmax(-1).mean(1))
    torch.testing.assert_close(average_view_probs(model(fold_views(x)), 3), logits)


@pytest.fixture
def kinetics_root(tmp_path):
    for split, names in (("train", ("a/a0", "a/a1", "b/b0", "b/b1")), ("val", ("a/v0", "b/v1"))):
        for name in names:
            write_video(tmp_path / split / f"{name}.mp4")
    (tmp_path / "train" / "b" / "corrupt.mp4").write_bytes(b"not a video")
    return tmp_path


@pytest.mark.parametrize("override, says", [("+model.num_classes=5", "model.num_classes=5 but data=moving_digits has "
                                            "num_classes=8"), ("+model.in_chans=3", "model.in_chans=3 but")])
def test_a_class_or_channel_count_the_data_contradicts_is_refused(tmp_path, override, says):
    """The dataset sets num_classes and in_chans; another value was replaced silently (and logged as given)."""
    from training.config import ConfigError

    cfg = compose_cfg(["data=moving_digits", "model=videosparseformer_nano", *TINY_MODEL, override, *FAST, *TINY_CLIPS,
                       f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=says):
        train_script.train(cfg, tmp_path)


def test_kinetics_folder_trains_and_evaluates_over_views(kinetics_root, tmp_path, caplog):
    run_dir = tmp_path / "run"
    cfg = compose_cfg(["data=kinetics", f"data.root={kinetics_root}", "model=videosparseformer_nano", *TINY_MODEL,
                       "+model.in_chans=3", *FAST, "data.batch_size=2", "data.eval_batch_size=2", "data.num_workers=0",
                       "data.num_frames=4", "data.frame_stride=1", "data.image_size=32", "data.test_clips=2",
                       "data.test_crops=1", "data.augment.repeats=1", "data.augment.randaugment=null",
                       "data.augment.mixup=null", "trainer.epochs=1", f"run_dir={run_dir}"])
    with caplog.at_level("WARNING"):
        top1 = train_script.train(cfg, run_dir)
    assert 0 <= top1 <= 100
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in metrics if "val/top1" in m][-1]
    assert final["val/images"] == 2  # two videos, each scored once on its averaged views
    assert "corrupt.mp4" in caplog.text
