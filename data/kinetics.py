"""Kinetics-400 (and any video classification set) in the layouts the field uses, decoded with PyAV
(its wheel bundles FFmpeg) on the loader's CPU workers.

Layouts, for split in {train, val}, tried in this order:
  1. a list file `root/<split>.csv` (or `list_file=`, `~` expanded, absolute or relative to `root`):
     one `path label` line per video, separated by a space or a comma (SlowFast / VideoMAE / mmaction2),
     path relative to `root` or absolute, label an integer class index; blank lines and lines starting
     with `#` are ignored. Up to 1,000 listed paths (evenly spaced) are checked at build: none found is
     an error naming the list, some missing a warning;
  2. class folders `root/<split>/<class name>/*.mp4` (also .webm .mkv .avi .mov), classes sorted by name.
Both splits take the same layout: a list's labels cannot be checked against another split's folders.

Clip sampling (SlowFast / VideoMAE): a clip is `num_frames` frames `frame_stride` apart (a span of
(num_frames - 1) * frame_stride + 1 frames; indices past the last frame repeat the last frame).
The stride counts decoded frames, whatever the video's frame rate (as VideoMAE and mmaction2 do;
SlowFast resamples to 30 fps first): Kinetics is mostly 25-30 fps.
- Training: one clip at a uniformly random start (temporal jitter), one random-resized-crop box and
  one flip decision for all its frames (`imagenet.random_resized_crop_box`), resized to image_size².
  Item: (uint8 clip (3, T, S, S), label).
- Evaluation: `test_clips` clips whose starts are the centres of equal segments of the video (one clip
  = the centre clip), each resized so that its short side is image_size, then `test_crops` square
  crops along the long side (3: start, centre, end, i.e. left/centre/right or top/centre/bottom;
  1: centre). Item: (uint8 views (V, 3, T, S, S), label), V = test_clips * test_crops > 1, clip-major
  (V = 1: the clip (3, T, S, S), as in training):
  view v is clip v // test_crops, crop v % test_crops. Batched, (B, V, 3, T, S, S): the evaluator runs
  `fold_views` and averages the views' softmax probabilities with `average_view_probs`.

Frame counts: the decoder's, not the header's. A video that decodes fewer frames than its header
states (common: clips cut without re-encoding) is sampled from the frames it has; a container that
states none (webm/mkv) is counted by demuxing, not by decoding it whole (`decode_frames`).
Decoding: the first video stream that is not an attached cover picture; frames whose short side is
above `decode_short_side` (320) are scaled down as they are converted, so a raw 1080p or 4K download
costs a loader worker what a resized copy does. Decoding starts at the first frame (no seeking): the
cost of a clip grows with its position, fine for Kinetics' 10 s clips; trim untrimmed videos first.
A missing, undecodable or truncated video (less than half its stated frames decode) is logged once
(per loader worker) with its path and the item is None: `collate_skip_none` drops it and counts it.
A missing root, a list with no videos or a malformed line is an error that names the path.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .base import (  # noqa: F401 (average_view_probs, fold_views: for callers of this module)
    DatasetBuilder,
    InputSpec,
    Splits,
    average_view_probs,
    check_crop,
    expect,
    fold_views,
    folder_root,
    is_int,
)
from .imagenet import random_resized_crop_box, scan_class_folders

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
_LIST_LINE = re.compile(r"^(.+?)\s*[,\s]\s*(\d+)$")  # the path (may hold spaces), one separator, the label


class UnreadableVideo(Exception):
    """A video that cannot give the frames a clip needs (corrupt, truncated, no video stream)."""


def read_list_file(list_file: Path, root: Path) -> list[tuple[str, int]]:
    """`path label` lines (space or comma separated; the path may itself hold spaces) -> (path, label)."""
    samples = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _LIST_LINE.match(line)
        if match is None:
            raise ValueError(f"{list_file}:{lineno}: expected 'path label' (space or comma separated, integer label), "
                             f"got {line!r}")
        path = Path(match[1])
        samples.append((str(path if path.is_absolute() else root / path), int(match[2])))
    if not samples:
        raise ValueError(f"{list_file}: no videos listed (expected 'path label' lines)")
    return samples


def resolve_list(root: Path, list_file: str | Path) -> Path:
    """A `train_list`/`val_list` value: `~` expanded, then absolute or relative to root."""
    path = Path(list_file).expanduser()
    return path if path.is_absolute() else root / path


PATH_PROBES = 1000  # listed paths checked at build (evenly spaced): enough to catch a wrong prefix, cheap on NFS


def check_listed_paths(list_file: Path, root: Path, samples: list[tuple[str, int]]) -> None:
    """A list whose paths do not resolve (a prefix from another machine, paths relative to another
    folder) is an error now, not one warning per video an epoch later; some missing files, a warning."""
    step = max(1, len(samples) // PATH_PROBES)
    probed = samples[::step]
    missing = [path for path, _ in probed if not Path(path).is_file()]
    if len(missing) == len(probed):
        raise FileNotFoundError(f"{list_file}: none of the {len(probed)} listed videos checked exists, e.g. "
                                f"{missing[0]} (relative paths are taken from data.root={root})")
    if missing:
        log.warning("%s: %d of %d listed videos checked do not exist (e.g. %s); they will be skipped and counted",
                    list_file, len(missing), len(probed), missing[0])


def find_videos(root: Path, split: str, list_file: str | Path | None = None):
    """(samples [(path, label)], class names or None for a list file) for one split."""
    if not root.is_dir():
        raise FileNotFoundError(f"Kinetics root not found: {root}")
    if list_file is None and (root / f"{split}.csv").is_file():
        list_file = root / f"{split}.csv"
    if list_file is not None:
        list_file = resolve_list(root, list_file)
        if not list_file.is_file():
            raise FileNotFoundError(f"Kinetics list file not found: {list_file}")
        samples = read_list_file(list_file, root)
        check_listed_paths(list_file, root, samples)
        return samples, None
    if (root / split).is_dir():
        samples, classes = scan_class_folders(root / split, VIDEO_EXTENSIONS)
        if not samples:
            raise ValueError(f"{root / split}: no videos found (expected {root / split}/<class>/*.mp4)")
        return samples, classes
    raise FileNotFoundError(f"Kinetics split {split!r} not found under {root}: expected {root / f'{split}.csv'} "
                            f"('path label' lines) or class folders {root / split}/<class>/*.mp4")


def clip_indices(start: int, num_frames: int, stride: int, total: int) -> np.ndarray:
    """Frame indices of one clip, (num_frames,): start, start + stride, ..., clamped to the last frame."""
    return np.minimum(start + stride * np.arange(num_frames), total - 1)


def video_stream(container):
    """The container's first video stream that is not an attached picture (the cover image some
    downloaders embed as a one-frame "video" stream)."""
    from av.stream import Disposition

    for stream in container.streams.video:
        if not stream.disposition & Disposition.attached_pic:
            return stream
    raise UnreadableVideo("no video stream")


@functools.lru_cache(maxsize=1 << 20)  # per loader worker: a webm/mkv is demuxed once, not every epoch
def stated_frames(path: str) -> int:
    """The frame count a video's header states; containers that omit it (webm/mkv often do) are counted
    by demuxing their video packets, without decoding."""
    import av

    with av.open(path) as container:
        stream = video_stream(container)
        return stream.frames if stream.frames > 0 else sum(1 for p in container.demux(stream) if p.size)


def decoded_size(width: int, height: int, short_side: int | None) -> dict:
    """to_ndarray's size arguments: the frame scaled (area-averaged) so that its short side is
    `short_side` when it is larger; {} (the decoded size) otherwise or when short_side is None."""
    if short_side is None or min(width, height) <= short_side:
        return {}
    scale = short_side / min(width, height)
    return {"width": max(short_side, round(width * scale)), "height": max(short_side, round(height * scale)),
            "interpolation": "AREA"}


def decode_indices(path: str, idx: np.ndarray, short_side: int | None = None) -> tuple[dict, int]:
    """({frame index: uint8 (H, W, 3)} for the indices asked, frames decoded): decoding stops after the
    largest index; fewer frames than asked means the video ended first. Frames whose short side is
    above `short_side` are scaled down as they are converted (a 1080p clip is never held at 1080p)."""
    import av

    needed, last = set(idx.reshape(-1).tolist()), int(idx.max())
    kept, count = {}, 0
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video_stream(container))):
            count = i + 1
            if i in needed:
                kept[i] = frame.to_ndarray(format="rgb24", **decoded_size(frame.width, frame.height, short_side))
            if i >= last:
                break
    return kept, count


MIN_DECODED_FRACTION = 0.5  # a video that decodes less than this of its stated frames is truncated


def decode_frames(path: str, choose, short_side: int | None = None) -> np.ndarray:
    """Decode the frames a sampler asks for: `choose(total_frames)` -> indices (any shape, repeats
    allowed). Returns uint8 frames (*indices.shape, H, W, 3), scaled to `short_side` when larger
    (`decoded_size`); decoding stops after the last frame needed.

    The decoder, not the header, has the last word: many videos decode fewer frames than their header
    states (a stream-copy cut away from a keyframe keeps packets the decoder drops). Such a video is
    re-sampled with `choose(frames decoded)`, so an evaluation clip at the end or a video shorter than
    a clip still reads; one that decodes less than MIN_DECODED_FRACTION of its stated frames is a
    truncated file and raises UnreadableVideo, as do one with no video stream and one with no frames."""
    total = stated_frames(path)
    if total <= 0:
        raise UnreadableVideo("no frames")
    idx = np.asarray(choose(total))
    kept, count = decode_indices(path, idx, short_side)
    if len(kept) < len(set(idx.reshape(-1).tolist())):  # the video ended before the last index
        if count < MIN_DECODED_FRACTION * total:
            raise UnreadableVideo(f"truncated: decoded {count} of the {total} frames its header states")
        idx = np.asarray(choose(count))
        kept, _ = decode_indices(path, idx, short_side)
    first = kept[int(idx.max())]
    return np.stack([kept[i] for i in idx.reshape(-1)]).reshape(*idx.shape, *first.shape)


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (T, 3, h, w) -> uint8 (T, 3, *size), bilinear with antialiasing (the same op on every frame)."""
    out = F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def short_side_crops(frames: torch.Tensor, size: int, num_crops: int) -> torch.Tensor:
    """uint8 (T, 3, h, w) -> (num_crops, T, 3, size, size): short side resized to `size`, then square
    crops at the start, centre and end of the long side (num_crops=3) or the centre only (1)."""
    h, w = frames.shape[-2:]
    nh, nw = (size, max(size, round(w * size / h))) if h <= w else (max(size, round(h * size / w)), size)
    frames = resize_frames(frames, (nh, nw))
    slack_y, slack_x = nh - size, nw - size
    positions = (0.5,) if num_crops == 1 else (0.0, 0.5, 1.0)
    crops = []
    for p in positions:
        y, x = round(slack_y * p), round(slack_x * p)
        crops.append(frames[..., y:y + size, x:x + size])
    return torch.stack(crops)


class KineticsClips(Dataset):
    """Item key (index, seed) -> training (uint8 clip (3, T, S, S), label); evaluation
    (uint8 views (V, 3, T, S, S), label), V = test_clips * test_crops clip-major (one view: (3, T, S, S));
    or None when the video cannot be read (logged once with its path)."""

    in_chans = 3

    def __init__(self, root: str | Path, split: str = "train", train: bool = True, num_frames: int = 16,
                 frame_stride: int = 4, image_size: int = 224, test_clips: int = 5, test_crops: int = 3,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, num_classes: int | None = None,
                 list_file: str | Path | None = None, decode_short_side: int | None = 320):
        for key, value in (("num_frames", num_frames), ("frame_stride", frame_stride), ("test_clips", test_clips)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KineticsClips: {key}={value!r} must be a positive integer")
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"KineticsClips: image_size={image_size!r} must be an integer >= 8")
        if test_crops not in (1, 3):
            raise ValueError(f"KineticsClips: test_crops={test_crops!r} must be 1 (centre) or 3 (start, centre, end)")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"KineticsClips: scale={list(scale)} must satisfy 0 < min <= max <= 1 and "
                             f"ratio={list(ratio)} 0 < min <= max")
        if not 0 <= hflip <= 1:
            raise ValueError(f"KineticsClips: hflip={hflip} is a probability, in [0, 1]")
        if decode_short_side is not None and (not isinstance(decode_short_side, int) or decode_short_side < image_size):
            raise ValueError(f"KineticsClips: decode_short_side={decode_short_side!r} must be null (decoded size) "
                             f"or an integer >= image_size={image_size}")
        self.root = Path(root).expanduser()
        self.samples, self.classes = find_videos(self.root, split, list_file)
        labels = [label for _, label in self.samples]
        self.num_classes = len(self.classes) if self.classes is not None else max(labels) + 1
        if num_classes is not None:
            if max(labels) >= num_classes:
                raise ValueError(f"KineticsClips: {split} lists label {max(labels)} but num_classes={num_classes}")
            self.num_classes = num_classes
        self.train, self.num_frames, self.frame_stride, self.image_size = train, num_frames, frame_stride, image_size
        self.test_clips, self.test_crops = test_clips, test_crops
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.decode_short_side = decode_short_side
        self.reported: set[str] = set()  # paths already logged in this process

    @property
    def num_views(self) -> int:
        return 1 if self.train else self.test_clips * self.test_crops

    def __len__(self) -> int:
        return len(self.samples)

    def starts(self, total: int, rng: np.random.Generator | None) -> list[int]:
        """Clip start frames: one random start (training) or the centres of `test_clips` equal segments."""
        slack = max(total - ((self.num_frames - 1) * self.frame_stride + 1), 0)
        if rng is not None:
            return [int(rng.integers(0, slack + 1))]
        return [int(slack * (i + 0.5) / self.test_clips) for i in range(self.test_clips)]

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        path, label = self.samples[index]
        rng = np.random.default_rng(seed) if self.train else None
        try:
            frames = decode_frames(path, lambda total: np.stack(
                [clip_indices(s, self.num_frames, self.frame_stride, total) for s in self.starts(total, rng)]),
                self.decode_short_side)
        except MemoryError:  # the machine's problem, not the file's
            raise
        except Exception as e:  # missing, corrupt or truncated: one bad video must not end a run
            if path not in self.reported:
                self.reported.add(path)
                log.warning("skipping unreadable video %s (%s: %s)", path, type(e).__name__, e)
            return None
        clips = torch.from_numpy(frames).permute(0, 1, 4, 2, 3)  # (clips, T, 3, h, w)
        s = self.image_size
        if self.train:
            h, w = clips.shape[-2:]
            left, top, right, bottom = random_resized_crop_box(w, h, rng, self.scale, self.ratio)
            clip = resize_frames(clips[0, :, :, top:bottom, left:right], (s, s))
            if rng.random() < self.hflip:
                clip = clip.flip(-1)
            return clip.transpose(0, 1).contiguous(), label  # (3, T, S, S)
        views = torch.cat([short_side_crops(c, s, self.test_crops) for c in clips])  # (V, T, 3, S, S)
        views = views.transpose(1, 2).contiguous()  # (V, 3, T, S, S)
        return (views[0] if len(views) == 1 else views), label  # one view: a clip, as InputSpec(views=1) says


@dataclass
class KineticsBuilder(DatasetBuilder):
    """conf/data/kinetics.yaml: root (or $KINETICS_ROOT) with {train,val}.csv of `path label` lines or
    {train,val}/<class>/*.mp4 folders. Training: one random clip of num_frames x frame_stride, a
    random-resized crop and flip shared by its frames. Evaluation: test_clips x test_crops views per
    video, whose softmax probabilities train.py averages."""

    yields_clips: ClassVar[bool] = True

    root: str | None = None
    train_list: str | None = None
    val_list: str | None = None
    num_classes: int | None = None
    num_frames: int = 16
    frame_stride: int = 4
    image_size: int = 224
    test_clips: int = 5
    test_crops: int = 3
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    decode_short_side: int | None = 320

    def resolved_root(self) -> Path:
        return folder_root(self.root, "KINETICS_ROOT", "Kinetics")

    def check(self) -> None:
        root = self.resolved_root()
        expect(root.is_dir(), "root", str(root), "no such directory (expected root/{train,val}.csv or "
               "root/{train,val}/<class>/*.mp4)")
        for key in ("num_frames", "frame_stride", "test_clips"):
            value = getattr(self, key)
            expect(is_int(value) and value >= 1, key, value, "must be a positive integer")
        expect(is_int(self.image_size) and self.image_size >= 32, "image_size", self.image_size,
               "must be an integer >= 32")
        expect(self.num_classes is None or (is_int(self.num_classes) and self.num_classes > 1), "num_classes",
               self.num_classes, "must be null (from the train split) or an integer > 1")
        expect(self.test_crops in (1, 3), "test_crops", self.test_crops, "must be 1 (centre) or 3 (start, centre, end)")
        check_crop(self)
        expect(self.decode_short_side is None or (is_int(self.decode_short_side)
                                                  and self.decode_short_side >= self.image_size),
               "decode_short_side", self.decode_short_side,
               f"must be null or an integer >= image_size={self.image_size}")
        for key in ("train_list", "val_list"):
            value = getattr(self, key)
            expect(value is None or resolve_list(root, value).is_file(), key, value,
                   f"no such list file (absolute, or relative to data.root={root}; a 'path label' line per video)")

    def build(self) -> Splits:
        root = self.resolved_root()
        try:  # here, once: a broken install inside the workers would read as every video unreadable
            import av  # noqa: F401
        except ImportError as e:
            raise ImportError(f"data=kinetics decodes with PyAV, which does not import ({e}): pip install av") from e
        common = dict(num_frames=self.num_frames, frame_stride=self.frame_stride, image_size=self.image_size,
                      decode_short_side=self.decode_short_side)
        train = KineticsClips(root, "train", train=True, scale=self.scale, ratio=self.ratio, hflip=self.hflip,
                              num_classes=self.num_classes, list_file=self.train_list, **common)
        val = KineticsClips(root, "val", train=False, test_clips=self.test_clips, test_crops=self.test_crops,
                            num_classes=train.num_classes, list_file=self.val_list, **common)
        if (train.classes is None) != (val.classes is None):
            listed = "train" if train.classes is None else "val"
            raise ValueError(f"{train.root}: the {listed} split is a list file of labels and the other is class "
                             "folders, so nothing ties the two label sets together; give both splits the same layout "
                             "(a list file each, or class folders each)")
        if train.classes is not None and train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))
            only_val = sorted(set(val.classes) - set(train.classes))
            raise ValueError(f"{train.root}: train and val hold different class folders: only in train "
                             f"{only_train[:5] or 'none'}, only in val {only_val[:5] or 'none'}"
                             + (" (more in each)" if max(len(only_train), len(only_val)) > 5 else ""))
        return Splits(train, val, InputSpec(train.num_classes, 3, self.image_size, frames=self.num_frames,
                                            views=val.num_views))

    @staticmethod
    def transform_class() -> type:
        from .video_augment import VideoBatchTransform

        return VideoBatchTransform
