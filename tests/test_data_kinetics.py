"""Kinetics-style video loading with PyAV: both layouts, clip sampling, test views, bad videos."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from data import collate_skip_none
from data.kinetics import KineticsBuilder, KineticsClips, average_view_probs, fold_views

av = pytest.importorskip("av")

W, H, FRAMES = 40, 24, 20


def write_video(path, num_frames=FRAMES, faststart=False, codec="mpeg4", options=None, size=(W, H),
                texture=False):
    """A tiny mpeg4 video: green = 10 x frame index (time), red = a left-to-right ramp (space)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        # high rate: levels survive within ~1
        stream = container.add_stream(codec, rate=10, bit_rate=4_000_000, options=options or {})
        (stream.width, stream.height), stream.pix_fmt = size, "yuv420p"
        for i in range(num_frames):
            frame = np.zeros((size[1], size[0], 3), np.uint8)
            frame[..., 0] = np.linspace(0, 250, size[0]).astype(np.uint8)[None]
            frame[..., 1] = 10 * i
            if texture:  # an edge for P-frames to predict from their reference
                frame[:, : size[0] // 2, 2] = 255
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
    logits = torch.randn(12, 5, dtype=torch.bfloat16)  # view v of clip b is row b*6 + v
    probs = average_view_probs(logits, 6)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, logits.float().softmax(-1).view(2, 6, 5).mean(1))
    # the mean of probabilities, not of logits: each view's vote is bounded, so one view's huge logit
    # does not outvote three that agree
    two = torch.tensor([[10.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert average_view_probs(two, 4).argmax(-1).item() == 1 and two.mean(0).argmax().item() == 0


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
    # one view per video: items are clips, as views=1 tells the evaluator (it folds no view axis)
    one = KineticsBuilder(str(root), num_frames=4, frame_stride=2, image_size=16, test_clips=1, test_crops=1).build()
    assert one.spec.views == 1 and one.val[(0, 0)][0].shape == (3, 4, 16, 16)


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


def cut_without_reencoding(src, dst, first_packet):
    """Stream-copy `src` from packet `first_packet` on, not a keyframe (how many Kinetics clips were cut):
    the header counts every packet, the decoder drops those before the next keyframe."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for k, packet in enumerate(inp.demux(stream)):
            if packet.dts is None or k < first_packet:
                continue
            packet.stream = copy
            out.mux(packet)
    return dst


def test_a_header_that_overstates_the_frames_is_not_taken_for_truncation(tmp_path):
    # H.264, a keyframe every 10 frames: its decoder drops the P-frames whose reference was cut away
    src = write_video(tmp_path / "src.mp4", num_frames=25, codec="libx264", size=(64, 48), texture=True,
                      options={"g": "10", "keyint_min": "10", "bf": "0"})
    cut = cut_without_reencoding(src, tmp_path / "train" / "c" / "cut.mp4", first_packet=3)
    with av.open(str(cut)) as c:
        stated = c.streams.video[0].frames
        decoded = [round(f.to_ndarray(format="rgb24")[..., 1].mean() / 10) for f in c.decode(video=0)]
    assert stated == 22 and 11 <= len(decoded) < stated  # the fixture is what it claims to be
    (tmp_path / "val").symlink_to(tmp_path / "train")
    train = KineticsClips(tmp_path, "train", num_frames=4, frame_stride=4, image_size=16)  # span 13 of 22 stated
    assert all(train[(0, seed)] is not None for seed in range(8))
    val = KineticsClips(tmp_path, "val", train=False, num_frames=4, frame_stride=4, image_size=16, test_clips=3)
    views, _ = val[(0, 0)]  # the last clip reaches past the decoded end: re-sampled from the frames decoded
    start = int((len(decoded) - 13) * 2.5 / 3)
    assert frame_indices(views[-1]) == [decoded[start + 4 * k] for k in range(4)]


def test_a_container_without_a_frame_count_is_counted_not_decoded_whole(tmp_path):
    from data.kinetics import stated_frames

    mkv = write_video(tmp_path / "v.mkv")
    with av.open(str(mkv)) as c:
        assert c.streams.video[0].frames == 0  # matroska states no count
    assert stated_frames(str(mkv)) == FRAMES
    clip, _ = KineticsClips(tmp_path, "val", train=False, num_frames=4, frame_stride=2, image_size=16, test_clips=1,
                            test_crops=1, list_file=write_list(tmp_path, "v.mkv 0"))[(0, 0)]
    assert frame_indices(clip) == [6, 8, 10, 12]  # the centre clip of 20 frames (one view: a (3, T, S, S) clip)


def write_list(folder, *lines, name="list.csv"):
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


def test_a_list_whose_paths_do_not_resolve_stops_at_build(root, tmp_path):
    lst = write_list(tmp_path, "train/abseiling/a0.mp4 0", "train/zumba/z0.mp4 1")  # relative to the wrong root
    with pytest.raises(FileNotFoundError, match=r"list\.csv: none of the 2 listed videos checked exists, e\.g\. .*"
                                                r"a0\.mp4 \(relative paths are taken from data\.root="):
        KineticsClips(tmp_path, "train", list_file=lst)
    assert len(KineticsClips(root, "train", list_file=lst)) == 2  # the right root


def test_list_paths_resolve_the_same_in_check_and_build(root, tmp_path, monkeypatch):
    (root / "lists").mkdir(exist_ok=True)
    write_list(root / "lists", f"{root}/train/abseiling/a0.mp4 0", f"{root}/val/zumba/short.mp4 1", name="t.csv")
    b = KineticsBuilder(str(root), train_list="lists/t.csv", val_list="lists/t.csv", num_frames=2, image_size=32)
    b.check()
    assert len(b.build().train) == 2
    monkeypatch.chdir(root / "lists")  # relative to the working directory is not relative to root
    with pytest.raises(ValueError, match=r"data\.train_list='t\.csv': no such list file \(absolute, or relative to "):
        KineticsBuilder(str(root), train_list="t.csv").check()
    monkeypatch.setenv("HOME", str(root))
    KineticsBuilder(str(tmp_path), train_list="~/lists/t.csv", val_list="~/lists/t.csv").check()


def test_a_list_for_one_split_and_class_folders_for_the_other_is_refused(root, tmp_path):
    (tmp_path / "val").symlink_to(root / "val")
    write_list(tmp_path, f"{root}/train/abseiling/a0.mp4 1", name="train.csv")
    with pytest.raises(ValueError, match="the train split is a list file of labels and the other is class folders"):
        KineticsBuilder(str(tmp_path), num_frames=2, image_size=32).build()
    with pytest.raises(ValueError, match=r"data\.test_crops=2: must be 1"):
        KineticsBuilder(str(root), test_crops=2).check()


def write_with_cover(path, num_frames=FRAMES):
    """An mp4 with an embedded cover picture (what `yt-dlp --embed-thumbnail` writes) besides the clip."""
    from av.stream import Disposition

    with av.open(str(path), "w") as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 16, 16, "yuvj420p"
        cover.disposition = Disposition.attached_pic
        stream = container.add_stream("mpeg4", rate=10, bit_rate=4_000_000)
        (stream.width, stream.height), stream.pix_fmt = (W, H), "yuv420p"
        for packet in cover.encode(av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in cover.encode():
            container.mux(packet)
        for i in range(num_frames):
            frame = np.zeros((H, W, 3), np.uint8)
            frame[..., 1] = 10 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_an_embedded_cover_picture_is_not_taken_for_the_video(tmp_path):
    """The clip is the first video stream that is not an attached picture: with an mp4's cover (which
    its muxer stores after the clip) and with one listed first, as other containers may."""
    from types import SimpleNamespace

    from av.stream import Disposition

    from data.kinetics import UnreadableVideo, decode_frames, video_stream

    path = write_with_cover(tmp_path / "covered.mp4")
    with av.open(str(path)) as container:
        assert {int(s.disposition) & Disposition.attached_pic for s in container.streams.video} == {0, 1024}
    frames = decode_frames(str(path), lambda total: np.arange(0, total, 4))
    assert frames.shape == (5, H, W, 3) and [round(f[..., 1].mean() / 10) for f in frames] == [0, 4, 8, 12, 16]
    cover, clip = SimpleNamespace(disposition=Disposition.attached_pic), SimpleNamespace(disposition=Disposition(0))
    assert video_stream(SimpleNamespace(streams=SimpleNamespace(video=[cover, clip]))) is clip
    with pytest.raises(UnreadableVideo, match="no video stream"):
        video_stream(SimpleNamespace(streams=SimpleNamespace(video=[cover])))


def test_large_frames_are_scaled_down_as_they_are_decoded(tmp_path):
    """decode_short_side: a 96 x 64 video decodes at short side 32 (48 x 32, its content kept); a video
    already at or below that short side, or decode_short_side=null, keeps its size."""
    from data.kinetics import decode_frames

    big = write_video(tmp_path / "big.mp4", size=(96, 64))
    choose = lambda total: np.array([0, 5])  # noqa: E731
    full, small = decode_frames(str(big), choose), decode_frames(str(big), choose, 32)
    assert full.shape == (2, 64, 96, 3) and small.shape == (2, 32, 48, 3)
    assert abs(float(small[1, ..., 1].mean()) - 50) < 3  # frame 5's green level
    ramp = small[0, 16, :, 0].astype(float)  # the left-to-right red ramp survives the scaling
    assert ramp[0] < 20 and ramp[-1] > 230 and (np.diff(ramp) >= -2).all()
    assert decode_frames(str(write_video(tmp_path / "small.mp4")), choose, 32).shape == (2, H, W, 3)  # 24 < 32
    clips = KineticsClips(tmp_path, "val", train=False, image_size=32, test_clips=1, test_crops=1,
                          list_file=write_list(tmp_path, f"{big} 0", f"{big} 1"), decode_short_side=32)
    assert clips[0][0].shape == (3, 16, 32, 32)
    with pytest.raises(ValueError, match="decode_short_side=16 must be null .* >= image_size=32"):
        KineticsClips(tmp_path, "val", train=False, image_size=32, list_file=tmp_path / "list.csv",
                      decode_short_side=16)


def test_different_class_folders_are_named(tmp_path):
    for split, classes in (("train", ("abseiling", "bowling")), ("val", ("abseiling", "curling"))):
        for c in classes:
            write_video(tmp_path / split / c / "v.mp4", num_frames=2)
    with pytest.raises(ValueError, match=r"only in train \['bowling'\], only in val \['curling'\]"):
        KineticsBuilder(root=str(tmp_path), image_size=32).build()


def test_a_memory_error_is_raised_not_counted_as_a_bad_video(root, monkeypatch):
    """Running out of memory is the machine's problem: it ends the item's worker instead of being
    logged as one more unreadable video (every video would be 'skipped' that way)."""
    import data.kinetics as kinetics

    ds = KineticsClips(root, "train", train=True, num_frames=4, frame_stride=2, image_size=16)
    monkeypatch.setattr(kinetics, "decode_frames", lambda *a, **k: (_ for _ in ()).throw(MemoryError("oom")))
    with pytest.raises(MemoryError):
        ds[(index_of(ds, "a0.mp4"), 0)]


def test_frame_counts_are_read_once_per_worker(tmp_path, monkeypatch):
    """stated_frames is cached: a webm/mkv without a header count is demuxed once, not at every epoch."""
    import data.kinetics as kinetics

    path = str(write_video(tmp_path / "v.mp4"))
    kinetics.stated_frames.cache_clear()
    opened = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert kinetics.stated_frames(path) == kinetics.stated_frames(path) == FRAMES
    assert opened == [path]


def test_a_broken_pyav_is_one_error_at_build(root, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("libavformat.so: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(ImportError, match="data=kinetics decodes with PyAV, which does not import"):
        KineticsBuilder(root=str(root), image_size=32).build()
