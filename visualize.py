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

from data import builder_from_config
from data.augment import BatchTransform
from data.samplers import EvalSampler
from model import load_official_checkpoint
from model.hub import read_checkpoint
from training.checkpoint import TrainState
from training.config import ConfigError, register_resolvers
from training.optim import EMA
from training.visualize import draw_sampling, plt

register_resolvers()
log = logging.getLogger("visualize")


def load_model(cfg: DictConfig):
    """(model in eval mode, the data config to draw from, its seed): a train.py checkpoint through its
    TrainState (EMA weights with use_ema), with the data it trained on; else the authors' weights."""
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise ConfigError(f"checkpoint={str(path)!r}: no such file")
    obj = read_checkpoint(path)
    if not (isinstance(obj, dict) and {"model", "step", "config"} <= set(obj)):
        return load_official_checkpoint(obj).eval(), cfg.data, cfg.seed
    run_cfg = OmegaConf.create(obj["config"])
    model = hydra.utils.instantiate(run_cfg.model, pretrained=False)  # the weights come from the checkpoint
    state = TrainState(model, ema=EMA(model, 0.5) if cfg.use_ema and obj.get("ema") is not None else None)
    state.load_state_dict(obj)
    return (state.ema.module if state.ema else model).eval(), run_cfg.data, run_cfg.seed


def visualize(cfg: DictConfig) -> Path:
    model, data_cfg, seed = load_model(cfg)
    if not hasattr(model, "sampling_grad_scale"):
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}: {type(model).__name__} has no RoIs to draw")
    splits = builder_from_config(data_cfg).build()
    val_set = splits.val
    keys = list(EvalSampler(len(val_set), seed=seed))
    items = [val_set[k] for k in keys[: 4 * cfg.num_images]]
    items = [it for it in items if it is not None][: cfg.num_images]  # undecodable files are skipped
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([it[1] for it in items])
    x, _ = BatchTransform(data_cfg.mean, data_cfg.std, splits.spec.num_classes, train=False)(images, labels)
    with torch.no_grad():
        out = model(x, return_aux=True)
    pred = out.logits.argmax(-1)
    titles = [f"label {int(y)}, predicted {int(p)}" for y, p in zip(labels, pred, strict=True)]
    fig = draw_sampling(x, out.rois, out.points, data_cfg.mean, data_cfg.std, titles=titles)
    dest = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).with_name(f"rois_{Path(cfg.checkpoint).stem}.png")
    fig.savefig(dest, dpi=120)
    plt.close(fig)
    log.info("wrote %s (%d images x %d sampling steps)", dest, len(items), len(out.rois))
    return dest


@hydra.main(config_path="conf", config_name="visualize", version_base="1.3")
def main(cfg: DictConfig) -> None:
    visualize(cfg)


if __name__ == "__main__":
    main()
