"""Draw each token's RoI and sampling points over input images, per sampling step (PNG).

    python visualize.py checkpoint=outputs/<run>/checkpoints/last.pt
    python visualize.py checkpoint=/path/sparseformer_t.pth data=imagenet data.root=/data/imagenet
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from data import build_datasets
from data.augment import BatchTransform
from data.samplers import EvalSampler
from model import load_official_checkpoint
from training.config import ConfigError, register_resolvers
from training.visualize import draw_sampling, plt

register_resolvers()
log = logging.getLogger("visualize")


def visualize(cfg: DictConfig) -> Path:
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint={str(path)!r}: no such file")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    ours = isinstance(obj, dict) and {"model", "step", "config"} <= set(obj)
    data_cfg = OmegaConf.create(obj["config"]).data if ours else cfg.data  # the data the run trained on
    _, val_set = build_datasets(data_cfg)
    if ours:
        model = hydra.utils.instantiate(OmegaConf.create(obj["config"]).model, num_classes=val_set.num_classes,
                                        in_chans=val_set.in_chans)
        use_ema = cfg.use_ema and obj.get("ema") is not None
        model.load_state_dict(obj["ema"]["module"] if use_ema else obj["model"])
    else:
        model = load_official_checkpoint(obj)
    if not hasattr(model, "sampling_grad_scale"):
        raise ConfigError(f"checkpoint={str(path)!r}: {type(model).__name__} has no RoIs to draw")
    model.eval()
    keys = list(EvalSampler(len(val_set), seed=OmegaConf.create(obj["config"]).seed if ours else cfg.seed))
    items = [val_set[k] for k in keys[: 4 * cfg.num_images]]
    items = [it for it in items if it is not None][: cfg.num_images]  # undecodable files are skipped
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items])
    x, _ = BatchTransform(data_cfg.mean, data_cfg.std, val_set.num_classes, train=False)(images, labels)
    with torch.no_grad():
        out = model(x, return_aux=True)
    pred = out.logits.argmax(-1)
    titles = [f"label {int(y)}, predicted {int(p)}" for y, p in zip(labels, pred)]
    fig = draw_sampling(x, out.rois, out.points, data_cfg.mean, data_cfg.std, titles=titles)
    dest = Path(cfg.out) if cfg.out else path.with_name(f"rois_{path.stem}.png")
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    log.info("wrote %s (%d images x %d sampling steps)", dest, len(items), len(out.rois))
    return dest


@hydra.main(config_path="conf", config_name="visualize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    visualize(cfg)


if __name__ == "__main__":
    main()
