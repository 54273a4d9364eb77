"""Kinetics-style video loading with PyAV: both layouts, clip sampling, test views, bad videos."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from data import collate_skip_none
from data.kinetics import KineticsBuilder, KineticsClips, average_view_logits, fold_views

av = pytest.importorskip("av")

W, H, FRAMES = 40, 24, 20


def write_video(path, num_frames=FRAMES, faststart=False):
    """A tiny mpeg4 video: green = 10 x frame index (time), red = a left-to-right ramp (space)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream("mpeg4", rate=10, bit_rate=4_000_000)  # high rate: levels survive within ~1
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(num_frames):
            frame = np.zeros((H, W, 3), np.uint8)
            frame[..., 0] = np.linspace(0, 250, W).astype(np.uint8)[None]
            frame[..., 1] = 10 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """root/{train,val}/<class>/*.mp4; train also holds one corrupt and one truncated video."""
    root = tmp_path_factory.mktemp("kinetics")
    for name in ("abseiling/a0", "abseiling/a1", "zumba/z0"):
        write_video(root / "train" / f"{name}.mp4")
    (root / "train" / "zumba" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all")
    whole = write_video(root / "tmp.mp4", faststart=True).read_bytes()  # header first: opens, then runs dry
    (root / "train" / "abseiling" / "truncated.mp4").write_bytes(whole[: len(whole) * 2 // 5])
    (root / "tmp.mp4").unlink()
    write_video(root / "val" / "abseiling" / "a.mp4")
    write_video(root / "val" / "zumba" / "short.mp4", num_frames=5)
    return root


def frame_indices(clip: torch.Tensor) -> list[int]:
    """Frame indices of a (3, T, h, w) clip, read back from the green level."""
    return [round(v / 10) for v in clip[1].float().mean((1, 2)).tolist()]


def index_of(ds, suffix):
    return next(i for i, (p, _) in enumerate(ds.samples) if p.endswith(suffix))


def test_class_folders_and_a_training_clip(root):
    ds = KineticsClips(root, "train", num_frames=4, frame_stride=3, image_size=16)
    assert ds.classes == ["abseiling", "zumba"] and ds.num_classes == 2 and len(ds) == 5
    starts = set()
    for seed in range(12):
        clip, label = ds[(index_of(ds, "a1.mp4"), seed)]
        assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.uint8 and label == 0
        idx = frame_indices(clip)
        assert np.diff(idx).tolist() == [3, 3, 3] and 0 <= idx[0] <= FRAMES - 10
        starts.add(idx[0])
    assert len(starts) > 3  # temporal jitter
    a, b = ds[(1, 5)], ds[(1, 5)]
    assert torch.equal(a[0], b[0])  # deterministic per key


def test_flip_and_crop_are_shared_by_all_frames(root):
    ds = KineticsClips(root, "train", num_frames=4, frame_stride=2, image_size=16, hflip=1.0)
    clip, _ = ds[(index_of(ds, "a0.mp4"), 3)]
    red = clip[0].float().mean(1)  # (T, W): the ramp, now falling from left to right
    assert (red[:, :4].mean(1) > red[:, -4:].mean(1)).all()
    assert (red - red[0]).abs().max() < 3.5  # the same box in every frame: codec noise only (one pixel of shift is ~6)


def test_test_views_are_clip_major_with_three_crops_along_the_long_side(root):
    ds = KineticsClips(root, "val", train=False, num_frames=4, frame_stride=2, image_size=16, test_clips=2)
    views, label = ds[(index_of(ds, "a.mp4"), 0)]
    assert views.shape == (6, 3, 4, 16, 16) and label == 0 and ds.num_views == 6
    # 20 frames, span 7: starts at the centres of two segments of the slack 13 -> 3 and 9
    assert [frame_indices(v) for v in views] == [[3, 5, 7, 9]] * 3 + [[9, 11, 13, 15]] * 3
    red = views[:, 0].float().mean((1, 2, 3))  # crop 0 / 1 / 2 = left / centre / right of the ramp
    assert red[0] < red[1] < red[2] and red[3] < red[4] < red[5]
    short, _ = ds[(index_of(ds, "short.mp4"), 0)]  # 5 frames < span 7: the last frame repeats
    assert frame_indices(short[0]) == [0, 2, 4, 4]


def test_view_helpers_average_each_clips_views():
    x = torch.zeros(2, 6, 3, 4, 8, 8)
    assert fold_views(x).shape == (12, 3, 4, 8, 8)
    logits = torch.arange(12.0).repeat_interleave(5).view(12, 5)  # view v of clip b has logits b*6 + v
    torch.testing.assert_close(average_view_logits(logits, 6), torch.tensor([2.5, 8.5]).repeat_interleave(5).view(2, 5))


def test_corrupt_truncated_and_missing_videos_are_logged_once_skipped_and_counted(root, tmp_path, caplog):
    ds = KineticsClips(root, "train", num_frames=8, frame_stride=2, image_size=16)
    bad = [index_of(ds, "corrupt.mp4"), index_of(ds, "truncated.mp4")]
    with caplog.at_level(logging.WARNING, logger="data.kinetics"):
        for _ in range(2):
            assert all(ds[(i, 0)] is None for i in bad)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("corrupt.mp4" in m for m in messages) == 1 and sum("truncated.mp4" in m for m in messages) == 1
    assert any("truncated" in m and "decoded" in m for m in messages)  # the header promised more frames
    clips, labels, skipped = collate_skip_none([ds[(i, 0)] for i in range(len(ds))])
    assert clips.shape == (3, 3, 8, 16, 16) and labels.tolist() == [0, 0, 1] and skipped == 2

    (tmp_path / "train.csv").write_text(f"{root}/train/zumba/z0.mp4 1\ngone/missing.mp4 0\n")
    listed = KineticsClips(tmp_path, "train", num_frames=2, image_size=16)
    with caplog.at_level(logging.WARNING, logger="data.kinetics"):
        assert listed[(1, 0)] is None
    assert "missing.mp4" in caplog.text


def test_list_files_space_or_comma_relative_or_absolute(root, tmp_path):
    (tmp_path / "clips dir").mkdir()
    write_video(tmp_path / "clips dir" / "x 1.mp4")
    (tmp_path / "train.csv").write_text(
        f"# path label\n{root}/train/abseiling/a0.mp4 3\n\nclips dir/x 1.mp4,7\n{root}/train/zumba/z0.mp4, 0\n")
    ds = KineticsClips(tmp_path, "train", num_frames=2, image_size=16)
    assert [label for _, label in ds.samples] == [3, 7, 0] and ds.num_classes == 8 and ds.classes is None
    assert ds.samples[1][0] == str(tmp_path / "clips dir" / "x 1.mp4")
    assert ds[(1, 0)][0].shape == (3, 2, 16, 16)
    with pytest.raises(ValueError, match="label 7 but num_classes=5"):
        KineticsClips(tmp_path, "train", num_classes=5)


def test_the_builder_reports_what_the_model_needs(root):
    splits = KineticsBuilder(str(root), num_frames=4, frame_stride=2, image_size=16, test_clips=2, test_crops=1).build()
    s = splits.spec
    assert (s.num_classes, s.in_chans, s.image_size, s.frames, s.views) == (2, 3, 16, 4, 2)
    assert splits.train.train and not splits.val.train and splits.val[(0, 0)][0].shape == (2, 3, 4, 16, 16)


def test_bad_roots_lists_and_arguments_are_one_line_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"Kinetics root not found: {tmp_path / 'nope'}"):
        KineticsClips(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"val\.csv.*class folders"):
        KineticsClips(tmp_path, "val")
    (tmp_path / "train.csv").write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'train.csv'}: no videos listed"):
        KineticsClips(tmp_path, "train")
    (tmp_path / "train.csv").write_text("a.mp4 1\nb.mp4 dog\n")
    with pytest.raises(ValueError, match=r"train\.csv:2: expected 'path label'"):
        KineticsClips(tmp_path, "train")
    (tmp_path / "empty" / "train" / "some_class").mkdir(parents=True)
    with pytest.raises(ValueError, match="no videos found"):
        KineticsClips(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="data.root=None: Kinetics needs a folder"):
        KineticsBuilder(None).check()
    with pytest.raises(ValueError, match="data.root=.*no such directory"):
        KineticsBuilder(str(tmp_path / "nope")).check()
    with pytest.raises(ValueError, match="test_crops"):
        KineticsClips(root, test_crops=2)
    with pytest.raises(ValueError, match="frame_stride"):
        KineticsClips(root, frame_stride=0)


def test_the_config_builds_and_checks(root):
    from data import builder_from_config
    from train_helpers import compose_cfg

    cfg = compose_cfg(["data=kinetics", f"data.root={root}"])
    s = builder_from_config(cfg.data).build().spec
    assert (s.num_classes, s.in_chans, s.image_size, s.frames, s.views) == (2, 3, 224, 16, 15)
    with pytest.raises(ValueError, match="data.frame_stride=0"):
        builder_from_config(compose_cfg(["data=kinetics", f"data.root={root}", "data.frame_stride=0"]).data)
