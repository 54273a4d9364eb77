"""Pretrained weights the timm way: `create_model(name, pretrained=...)` with

- `True`: the variant's released file (the registry's first release), downloaded once into the torch
  hub cache (`$TORCH_HOME/hub/checkpoints/`, `torch.hub.get_dir()`), with a progress bar;
- a release tag of the registry (e.g. "v1.0.0-imagenet"): that release's file, the same way;
- a URL (http(s)://): downloaded into the same cache, its file name prefixed with a hash of the whole
  URL (two runs' `.../checkpoints/last.pt`, or two repositories' `pytorch_model.bin`, never share a
  cached file); a file:// URL is read where it is;
- a path: that file (a train.py checkpoint, a bare state dict, or the authors' released files).

A download goes to a temporary file that is renamed only when complete (`torch.hub.download_url_to_file`),
so a partial download never counts as cached. Offline, the error names the URL and the exact path to
place the file at. Files are loaded weights-only (tensors and plain values, never arbitrary objects).
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import re
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema")  # timm's (ModelEma, its train.py's), ours ({"module": ..})


@dataclass(frozen=True)
class PretrainedCfg:
    """How a model family loads weights (timm's pretrained_cfg): the state-dict prefixes of its classifier
    (re-initialised when the class count differs) and of its first conv (a 3-channel stem summed for
    1-channel inputs), a converter from released layouts to ours, and released URLs per variant."""

    classifier: str | None = None
    first_conv: str | None = None
    filter_fn: Callable[[dict, nn.Module], dict] | None = None
    releases: dict[str, dict[str, str]] = field(default_factory=dict)  # variant -> {release tag: URL}


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file", "ftp")


def cached_path(url: str, unique: bool = False) -> Path:
    """Where the hub cache keeps `url`: <torch hub dir>/checkpoints/<file name of the URL>, the name
    prefixed with the first 8 hex digits of the URL's sha256 when `unique` (any URL not in the registry,
    whose file names are not unique: last.pt, pytorch_model.bin, Google Drive's `uc`)."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    if unique:
        name = f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{name}"
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def download(url: str, progress: bool = True, unique: bool = False) -> Path:
    """`url` in the hub cache (`cached_path`), downloaded unless already there; a clear error when it
    cannot be."""
    dst = cached_path(url, unique)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dst)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=progress)
    except (OSError, ValueError) as e:  # URLError / HTTPError / timeouts are OSErrors
        reason = getattr(e, "reason", None) or e
        raise RuntimeError(f"cannot download {url} ({reason}); without network, fetch that file elsewhere and "
                           f"place it at {dst} (or pass pretrained=<path to the file>)") from None
    return dst


def release_url(source, name: str, releases: dict[str, dict[str, str]]) -> str | None:
    """The registry URL that `source` (True or a release tag) names for variant `name`, else None."""
    if source is not True and not (isinstance(source, str) and any(source in r for r in releases.values())):
        return None
    if name not in releases:
        known = ", ".join(sorted(releases)) or "none"
        raise ValueError(f"{name}: no released weights (released: {known}); pass pretrained=<path or URL>")
    if source is True:
        return next(iter(releases[name].values()))
    if source not in releases[name]:
        raise ValueError(f"{name}: no file in release {source!r} (releases: {', '.join(releases[name])})")
    return releases[name][source]


def check_source(source, name: str, cfg: PretrainedCfg) -> None:
    """Raise ValueError at start for a `pretrained` value that cannot work (without downloading)."""
    if source is False or source is None or release_url(source, name, cfg.releases) is not None:
        return
    if not isinstance(source, str):
        raise ValueError(f"pretrained={source!r}: must be true, false, a release tag, a URL or a file path")
    if not is_url(source) and not Path(source).expanduser().is_file():
        raise ValueError(f"pretrained={source!r}: no such file (nor a URL or a release tag)")


def resolve(source, name: str, cfg: PretrainedCfg, progress: bool = True) -> Path:
    """The local file that `source` names (see the module docstring), downloading if needed."""
    check_source(source, name, cfg)
    release = release_url(source, name, cfg.releases)
    if release is not None:
        return download(release, progress)
    if is_url(source):
        parsed = urllib.parse.urlparse(source)
        if parsed.scheme == "file":  # a local file: read in place (a copy in the cache would go stale)
            return Path(urllib.request.url2pathname(parsed.path))
        return download(source, progress, unique=True)
    return Path(source).expanduser()


def read_checkpoint(path) -> object:
    """torch.load, weights-only (a checkpoint can never run code here); a file that is not one gets
    one line naming it and saying what it is."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise ValueError(f"{path}: holds pickled Python objects ({found.group(1)}), not only tensors, so "
                             "loading it could run code from the file; save a state dict (model.state_dict()) "
                             "instead, or load it yourself with weights_only=False if you trust its source") from None
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a "
                             "pickle)") from None
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        raise ValueError(f"{path}: not a weights-only checkpoint ({first})") from None
    except Exception as e:  # torch.load's errors for foreign and damaged files (IndexError, RuntimeError, EOFError)
        with path.open("rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"  # torch.save's format, cut short
        if zip_start or zipfile.is_zipfile(path) or "central directory" in str(e) or isinstance(e, EOFError):
            raise ValueError(f"{path}: truncated or corrupt checkpoint ({path.stat().st_size} bytes; its archive "
                             "is incomplete); write or download it again") from None
        raise ValueError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle: "
                         f"{type(e).__name__})") from None


def is_train_checkpoint(obj) -> bool:
    """A train.py checkpoint (training/checkpoint.py layout: weights beside their step and run config)."""
    return isinstance(obj, dict) and {"model", "step", "config"} <= set(obj) and isinstance(obj["config"], dict)


def find_state_dict(obj, use_ema: bool = False) -> tuple[dict, dict | None]:
    """(state dict, a config stored beside it or None) from a bare or wrapped checkpoint: under
    `state_dict` / `model` / `model_ema` / `module` (nested; with `use_ema` the EMA first where there
    is one: timm's `model_ema`, train.py's `ema`), a `module.` prefix stripped. A train.py checkpoint
    gives its `model` weights (its `ema` ones with `use_ema`)."""
    config = obj["config"] if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    order = EMA_KEYS + WRAPPER_KEYS if use_ema else WRAPPER_KEYS
    while isinstance(obj, dict):
        key = next((k for k in order if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        if key in EMA_KEYS and not use_ema:  # (only model_ema: a wrapper key too) the file has no raw weights
            log.warning("the checkpoint holds its weights under %r only (an EMA): loading those", key)
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint must be a state dict (or a dict wrapping one), got {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"no state dict found in checkpoint: keys are {sorted(obj)[:20]}; "
                         f"expected parameter tensors, bare or under one of {WRAPPER_KEYS}")
    return state, config


def check_state_dict(state: dict, model: nn.Module, source: str) -> None:
    """Raise listing every key of `state` that `model` lacks, has with another shape, or misses."""
    ours = model.state_dict()
    unplaced = [k for k in state if k not in ours]
    mismatched = [f"{k} {tuple(v.shape)} -> {tuple(ours[k].shape)}" for k, v in state.items()
                  if k in ours and tuple(ours[k].shape) != tuple(v.shape)]
    missing = sorted(set(ours) - set(state))
    if unplaced or mismatched or missing:
        raise ValueError(
            f"{source} does not match the model:\n"
            + (f"  keys it cannot place: {unplaced}\n" if unplaced else "")
            + (f"  shape mismatches (checkpoint -> model): {mismatched}\n" if mismatched else "")
            + (f"  model keys missing from the checkpoint: {missing}\n" if missing else "")
        )


def adapt_to_model(state: dict, model: nn.Module, cfg: PretrainedCfg) -> dict:
    """A different class count: drop the classifier (the model keeps its fresh init). A 3-channel stem
    for a 1-channel model: its weights summed over the colours (a grey image seen as RGB). One log line each."""
    ours, state = model.state_dict(), dict(state)
    head = [k for k in state if cfg.classifier and k.startswith(cfg.classifier + ".")]
    if head and any(k in ours and ours[k].shape != state[k].shape for k in head):
        before, after = state[head[0]].shape[0], ours[head[0]].shape[0]
        log.info("pretrained: the checkpoint has %d classes, the model %d: %s re-initialised", before, after,
                 cfg.classifier)
        for k in head:
            state[k] = ours[k]
    conv = f"{cfg.first_conv}.weight" if cfg.first_conv else None
    if conv in state and conv in ours and state[conv].shape[1] == 3 and ours[conv].shape[1] == 1:
        log.info("pretrained: %s summed over its 3 input channels for the model's 1", conv)
        state[conv] = state[conv].sum(dim=1, keepdim=True)
    return state


def load_pretrained(model: nn.Module, source, name: str, cfg: PretrainedCfg, progress: bool = True,
                    use_ema: bool = False) -> nn.Module:
    """Load the weights `source` names into `model` (any layout `cfg.filter_fn` knows, or ours); with
    `use_ema`, its EMA weights, which the file must hold."""
    if any(p.is_meta for p in model.parameters()):  # load_state_dict would copy into nothing, with warnings
        raise ValueError(f"{name}: pretrained weights cannot be loaded into a model on the meta device; build it "
                         "on the CPU or a GPU (or load its state dict yourself with assign=True)")
    path = resolve(source, name, cfg, progress)
    checkpoint = read_checkpoint(path)
    if use_ema and not (isinstance(checkpoint, dict) and any(isinstance(checkpoint.get(k), dict) for k in EMA_KEYS)):
        raise ValueError(f"{path}: pretrained_ema=true but the file holds no EMA weights (no {' / '.join(EMA_KEYS)}; "
                         "a run trained with trainer.ema_decay=null has none): drop pretrained_ema")
    state, _ = find_state_dict(checkpoint, use_ema)
    if cfg.filter_fn is not None:
        state = cfg.filter_fn(state, model)
    state = adapt_to_model(state, model, cfg)
    stored = checkpoint.get("config", {}).get("model", {}).get("name") if is_train_checkpoint(checkpoint) else None
    try:
        check_state_dict(state, model, f"pretrained weights {path}")
    except ValueError as e:
        if stored and stored != name:  # a train.py checkpoint says what it is: the first thing to check
            raise ValueError(f"pretrained weights {path} are a train.py checkpoint of {stored}, not {name}: "
                             f"use model={stored} (or weights of {name}); in detail: {e}") from None
        raise
    model.load_state_dict(state)
    log.info("%s: loaded pretrained %sweights from %s", name, "EMA " if use_ema else "", path)
    return model
