"""Draw each token's RoI and sampling points over input images, per sampling step (PNG); for a video
model, each token's tube and points over the frames of each clip (one PNG per clip).

    python visualize.py checkpoint=outputs/<run>/checkpoints/last.pt
    python visualize.py checkpoint=/path/sparseformer_t.pth data=imagenet data.root=/data/imagenet
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data import builder_from_config
from data.samplers import EvalSampler
from model import load_official_checkpoint
from model.flops import is_video_model
from model.hub import is_train_checkpoint, read_checkpoint
from training.config import ConfigError, input_kind, register_resolvers
from training.visualize import draw_sampling, draw_tubes, plt

log = logging.getLogger("visualize")


def log_dir_resolver(checkpoint) -> str:
    """hydra.run.dir of visualize.py: the run folder of a train.py checkpoint (<run>/checkpoints/last.pt),
    else the checkpoint's folder; visualize.log goes there. A path that does not exist gets a temporary
    folder, so a mistyped checkpoint leaves no empty folder behind."""
    parent = Path(str(checkpoint)).parent
    if not parent.is_dir():
        return tempfile.gettempdir()
    return str(parent.parent if parent.name == "checkpoints" else parent)


register_resolvers()
if not OmegaConf.has_resolver("sparseformer_visualize_dir"):
    OmegaConf.register_new_resolver("sparseformer_visualize_dir", log_dir_resolver)


def check(cfg: DictConfig, overrides: list[str]) -> None:
    """visualize.py reads checkpoint, num_images, use_ema, out and (for the authors' weights) data:
    a key added with `+` elsewhere would be silently ignored, so it is an error."""
    unread = [o for o in overrides if o.startswith("+") and not o.startswith(("+data.", "++data."))]
    if unread:
        raise ConfigError(f"{unread[0]}: visualize.py reads no such key (the model comes from the checkpoint); "
                          "remove it")
    n = cfg.num_images
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"num_images={n!r}: must be a positive integer")
    if cfg.out and not Path(cfg.out).expanduser().parent.is_dir():
        raise ConfigError(f"out={cfg.out!r}: the folder {Path(cfg.out).expanduser().parent} does not exist")


def load_model(cfg: DictConfig, overrides: list[str] = ()):
    """(model in eval mode, the data config to draw from): a train.py checkpoint's model built
    from its stored config (EMA weights with use_ema), with the data it trained on, where the command
    line's `data.<key>=` overrides still apply (`data=<its dataset> data.root=...` on another machine)
    and `data=<another dataset>` picks that one; else the authors' weights with the command's data
    (model.load_official_checkpoint reads both)."""
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint={str(path)!r}: no such file")
    obj = read_checkpoint(path)
    try:  # ours from its stored config, or the authors'
        model = load_official_checkpoint(obj, use_ema=cfg.use_ema).eval()
    except ValueError as e:  # (given the dict read above, its errors say "state dict:", not which file)
        raise ConfigError(f"checkpoint={str(path)!r}: {e}") from None
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    if not is_train_checkpoint(obj):
        return model, cfg.data
    data = OmegaConf.create(obj["config"]).data
    if "data" in keys and cfg.data.get("name") != data.get("name"):  # another dataset: the command's
        return model, cfg.data
    for key in keys:  # (data=<the run's own dataset> makes its keys overridable: data.root=...)
        if key.startswith("data."):
            OmegaConf.update(data, key[len("data."):], OmegaConf.select(cfg, key), force_add=True)
    return model, data


def visualize(cfg: DictConfig, overrides: list[str] = ()) -> list[Path]:
    """The PNGs written: one for images (a row per image), one per clip for a video model. `overrides`:
    the command line's (its data keys apply to a train.py checkpoint's stored data config)."""
    model, data_cfg = load_model(cfg, overrides)
    if not hasattr(model, "sampling_grad_scale"):
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}: {type(model).__name__} has no RoIs to draw")
    builder = builder_from_config(data_cfg)
    if is_video_model(model) != builder.yields_clips:
        raise ConfigError(f"data={data_cfg.get('name')} yields {input_kind(builder.yields_clips)} but the "
                          f"checkpoint's {type(model).__name__} takes {input_kind(is_video_model(model))}")
    splits = builder.build()
    val_set = splits.val
    keys = list(EvalSampler(len(val_set)))  # the test set train.py scores
    items = [val_set[k] for k in keys[: 4 * cfg.num_images]]
    items = [it for it in items if it is not None][: cfg.num_images]  # undecodable files are skipped
    if not items:
        raise ConfigError(f"data={data_cfg.name}: no readable validation sample to draw")
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items])
    transform = builder.transform_class()(data_cfg.mean, data_cfg.std, splits.spec.num_classes, train=False)
    x, _ = transform(images, labels)
    if x.dim() == 6:  # several test views per clip: draw the first
        x = x[:, 0]
    with torch.no_grad():
        out = model(x, return_aux=True)
    pred = out.logits.argmax(-1)
    titles = [f"label {int(y)}, predicted {int(p)}" for y, p in zip(labels, pred, strict=True)]
    base = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).with_name(f"rois_{Path(cfg.checkpoint).stem}.png")
    if x.dim() == 5:  # clips (B, C, T, H, W): one figure per clip, a row per sampling step, a column per frame
        figures = [draw_tubes(x[i], [r[i] for r in out.rois], [p[i] for p in out.points], data_cfg.mean,
                              data_cfg.std, title=titles[i]) for i in range(len(items))]
        dests = [base.with_name(f"{base.stem}_clip{i}{base.suffix}") for i in range(len(items))]
    else:
        figures = [draw_sampling(x, out.rois, out.points, data_cfg.mean, data_cfg.std, titles=titles)]
        dests = [base]
    for fig, dest in zip(figures, dests, strict=True):
        fig.savefig(dest, dpi=120)
        plt.close(fig)
    log.info("wrote %s (%d %s x %d sampling steps)", ", ".join(map(str, dests)), len(items),
             input_kind(x.dim() == 5), len(out.rois))
    return dests


@hydra.main(config_path="conf", config_name="visualize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        overrides = list(HydraConfig.get().overrides.task)
        check(cfg, overrides)
        visualize(cfg, overrides)
    except (ConfigError, ValueError) as e:  # one line that says what is wrong, no traceback
        raise SystemExit(f"config error: {e}") from None


if __name__ == "__main__":
    main()
