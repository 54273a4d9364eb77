"""`create_model(name, pretrained=False, **overrides)`: the one way in to every registered model."""
from __future__ import annotations

import inspect

import torch.nn as nn

from . import avit, cnn, deit, framewise, hub, sparseformer, video, vivit

_REGISTRY: dict[str, tuple[type, dict]] = {
    **{name: (sparseformer.SparseFormer, cfg) for name, cfg in sparseformer.VARIANTS.items()},
    **{name: (video.VideoSparseFormer, cfg) for name, cfg in video.VARIANTS.items()},
    **{name: (deit.DeiT, cfg) for name, cfg in deit.VARIANTS.items()},
    **{name: (avit.AViT, cfg) for name, cfg in avit.VARIANTS.items()},
    **{name: (cnn.SmallCNN, cfg) for name, cfg in cnn.VARIANTS.items()},
    **{name: (vivit.ViViT, cfg) for name, cfg in vivit.VARIANTS.items()},
    **{name: (framewise.FrameAveraged, cfg) for name, cfg in framewise.VARIANTS.items()},
}

# How each model class loads weights (model/hub.py); a class not listed loads only our own layout.
_PRETRAINED: dict[type, hub.PretrainedCfg] = {
    sparseformer.SparseFormer: hub.PretrainedCfg("head.classifier", "stem.conv1", sparseformer.checkpoint_filter_fn,
                                                 sparseformer.RELEASED_WEIGHTS),
    deit.DeiT: hub.PretrainedCfg("head", "patch_embed"),
    avit.AViT: hub.PretrainedCfg("head", "patch_embed"),
}


def accepted_arguments(cls: type) -> set[str]:
    """Keyword arguments of cls.__init__, following **kwargs up to the parent class."""
    accepted: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        accepted |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return accepted


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_class(name: str) -> type:
    """The class a registered name builds (its `takes_clips`, its accepted arguments), building nothing."""
    return check_model_args(name)[0]


def takes_clips(name: str) -> bool:
    """Whether a registered model takes clips (B, C, T, H, W) rather than images."""
    return getattr(model_class(name), "takes_clips", False)


def model_defaults(name: str) -> dict:
    """A registered name's default keyword arguments (a copy)."""
    return dict(check_model_args(name)[1])


def check_model_args(name: str, pretrained=False, pretrained_ema: bool = False, **overrides) -> tuple[type, dict]:
    """(class, its keyword arguments) for `create_model(name, pretrained, **overrides)`, or a
    ValueError naming the unknown name, the unknown override or the unusable `pretrained`; builds nothing."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    cls, defaults = _REGISTRY[name]
    accepted = accepted_arguments(cls)
    unknown = set(overrides) - accepted
    if unknown:
        raise ValueError(f"{name}: unknown override(s) {sorted(unknown)}; accepted: {sorted(accepted)}")
    if pretrained_ema and not pretrained:
        raise ValueError(f"{name}: pretrained_ema=true takes the EMA weights of `pretrained`, which is not set")
    if issubclass(cls, video.VideoSparseFormer):  # image weights, inflated (model/video.py)
        image = video.IMAGE_VARIANTS[name]
        hub.check_source(pretrained, image, _PRETRAINED[sparseformer.SparseFormer])
    else:
        hub.check_source(pretrained, name, _PRETRAINED.get(cls, hub.PretrainedCfg()))
    return cls, {**defaults, **overrides}


def _stored_state(source, name: str) -> dict:
    """The state dict in the file or URL `source` (read to decide how it loads, before loading)."""
    return hub.find_state_dict(hub.read_checkpoint(hub.resolve(source, name, hub.PretrainedCfg())))[0]


def _holds_video_weights(source, name: str) -> bool:
    """Whether the file or URL `source` holds a VideoSparseFormer's state dict (6-wide tube RoIs), not
    an image SparseFormer's to inflate; the authors' releases (true, a tag) are image weights."""
    if source is True or hub.release_url(source, video.IMAGE_VARIANTS[name],
                                         _PRETRAINED[sparseformer.SparseFormer].releases) is not None:
        return False
    roi = _stored_state(source, name).get("token_roi")
    return roi is not None and roi.shape[-1] == 6


def _holds_framewise_weights(source, name: str) -> bool:
    """Whether the file or URL `source` holds a FrameAveraged model's own state dict (keys under
    `image_model.`, e.g. a framewise run's last.pt), not the image model's weights to load into it."""
    return any(str(k).startswith("image_model.") for k in _stored_state(source, name))


def create_model(name: str, pretrained=False, pretrained_ema: bool = False, **overrides) -> nn.Module:
    """Build a registered model; `overrides` replace the variant's defaults.

    pretrained: False; True (the authors' released weights of this variant, downloaded once into the
    torch hub cache); a release tag; a URL; or a file (a train.py checkpoint, a state dict, the
    authors' v1/v2 files). A different num_classes re-initialises the classifier (model/hub.py) of the
    families with a PretrainedCfg classifier (SparseFormer, DeiT, A-ViT; a VideoSparseFormer through its
    image variant); the others (SmallCNN, ViViT) refuse weights of another class count by shape.
    pretrained_ema: take the file's EMA weights (a train.py checkpoint's `ema`, timm's `model_ema`)
    instead of its raw ones; an error when it has none.
    A VideoSparseFormer takes the weights of its image variant (video.IMAGE_VARIANTS), inflated, or a
    VideoSparseFormer's own (a file or URL holding 6-wide tube RoIs) as they are. A frame-averaged
    baseline (model/framewise.py) takes its image model's weights, or its own (keys under image_model.).

    SparseFormer keys: num_tokens, num_points, conv_dim, focusing_dim, cortex_dim, cortex_depth,
    focusing_repeats, num_heads, mlp_ratio, num_classes, in_chans, drop_path_rate, backend,
    fused_sample_mix, recompute_stem, checkpoint_cortex.
    DeiT keys: img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
    drop_path_rate, tome_r (ToMe merges per block, model/tome.py).
    A-ViT keys (model/avit.py): the DeiT keys but tome_r, and gate_scale, gate_center, eps,
    ponder_weight, distr_weight, target_depth.
    SmallCNN keys (model/cnn.py): in_chans, num_classes, widths.
    """
    cls, kwargs = check_model_args(name, pretrained, pretrained_ema, **overrides)
    model = cls(**kwargs)
    if pretrained and isinstance(model, video.VideoSparseFormer) and _holds_video_weights(pretrained, name):
        # a video model's own weights (e.g. a Kinetics run's last.pt, to fine-tune elsewhere): as they are
        hub.load_pretrained(model, pretrained, name, hub.PretrainedCfg("head.classifier", "stem.conv1"),
                            use_ema=pretrained_ema)
    elif pretrained and isinstance(model, video.VideoSparseFormer):
        # the image variant with the same widths takes the weights, then inflates into this model
        image_kwargs = {k: v for k, v in model.init_kwargs.items() if k != "replicates"}
        try:
            image = create_model(video.IMAGE_VARIANTS[name], pretrained=pretrained, pretrained_ema=pretrained_ema,
                                 **image_kwargs)
        except ValueError as e:
            image_name = video.IMAGE_VARIANTS[name]
            raise ValueError(f"{str(e).rstrip()}\n({name} inflates {image_name} weights into a model built with "
                             f"its own sizes, {model.spatial_tokens} spatial tokens x {model.replicates} replicates: "
                             "give it the image weights' sizes, e.g. num_tokens=<their token count>)") from None
        model.load_state_dict(video.inflate(image, model.replicates).state_dict())
    elif pretrained and isinstance(model, framewise.FrameAveraged) and not _holds_framewise_weights(pretrained, name):
        # an image model's weights (e.g. a sparseformer_nano run's last.pt) go into the per-frame model
        image_name = kwargs.get("image_model") if isinstance(kwargs.get("image_model"), str) else name
        hub.load_pretrained(model.image_model, pretrained, image_name,
                            _PRETRAINED.get(type(model.image_model), hub.PretrainedCfg()), use_ema=pretrained_ema)
    elif pretrained:
        hub.load_pretrained(model, pretrained, name, _PRETRAINED.get(cls, hub.PretrainedCfg()), use_ema=pretrained_ema)
    return model
