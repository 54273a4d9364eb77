"""Config checks that fail at start with the key and the reason, and the run-directory resolver."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from data.base import builder_from_config


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and says why."""


def run_dir_resolver(run_dir=None) -> str:
    """hydra.run.dir: `run_dir` if given; under torchrun, one folder per rendezvous id, so every
    rank (on every node sharing the filesystem) agrees; else outputs/<date>/<time>."""
    if run_dir not in (None, "None", "null", ""):
        return str(run_dir)
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"outputs/torchrun/{rdzv}"
    return time.strftime("outputs/%Y-%m-%d/%H-%M-%S")


def output_subdir_resolver(resume=None, run_dir=None) -> str | None:
    """hydra.output_subdir: only rank 0 writes the composed config (.hydra/) into the shared run dir; a
    resume into a folder that has one writes its own into .hydra/resume-<UTC time>/, so the config
    the run started with stays where it was."""
    if os.environ.get("RANK", "0") != "0":
        return None
    folder = Path(run_dir_resolver(run_dir))  # the run dir hydra.run.dir resolves to (torchrun: its rendezvous')
    if resume not in (None, "None", "null", "", False) and (folder / ".hydra" / "config.yaml").is_file():
        return time.strftime(".hydra/resume-%Y-%m-%d_%H-%M-%S", time.gmtime())
    return ".hydra"


def resolved_device(device: str) -> str:
    """hardware.device with `auto` decided for this machine: cuda when a CUDA device is usable."""
    import torch

    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def on_cpu_resolver(device: str, cpu_value, gpu_value):
    """`${sparseformer_on_cpu:${hardware.device},A,B}`: A when the run's device is the CPU, else B. For
    a recipe tuned on a CPU that must still start as-is on a GPU machine (conf/recipe/cluttered_mnist.yaml:
    two gloo ranks on a 2-core CPU, one rank on a GPU)."""
    return cpu_value if resolved_device(str(device)) == "cpu" else gpu_value


def register_resolvers() -> None:
    for name, fn in (("sparseformer_run_dir", run_dir_resolver), ("sparseformer_output_subdir", output_subdir_resolver),
                     ("sparseformer_on_cpu", on_cpu_resolver)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _get(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default="__absent__")
    if value == "__absent__":
        raise ConfigError(f"{key}: missing from the config")
    return value


def _check(cfg, key, ok, why):
    value = _get(cfg, key)
    if not ok(value):
        raise ConfigError(f"{key}={value!r}: {why}")
    return value


def _int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def resolve_hardware(hw) -> tuple[str, str, str]:
    """(device, precision, dist backend) with every `auto` decided for this machine."""
    import torch

    device = resolved_device(hw.device)
    if device == "cuda" and not torch.cuda.is_available():  # before any process is launched
        raise ConfigError("hardware.device=cuda but this machine has no usable CUDA device "
                          "(torch.cuda.is_available() is False); use hardware=cpu")
    if device == "cuda" and hw.processes > torch.cuda.device_count():
        raise ConfigError(f"hardware.processes={hw.processes} but only {torch.cuda.device_count()} CUDA device(s) "
                          "are visible; lower hardware.processes")
    precision = hw.precision
    if precision == "auto":
        # native bf16 only (sm_80+): on older GPUs torch would report emulated bf16 as supported, which is slow
        precision = "fp32" if device == "cpu" else (
            "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16")
    backend = hw.dist_backend if hw.dist_backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    return device, precision, backend


# Keys a resumed run may set differently from the run it continues: where it runs (another machine's
# device and collective backend) and logs, how far it goes, how it reads the data; not what it computes
# (model, data, optimiser, schedule, batch, precision, ranks, seed).
RESUME_MAY_CHANGE = ("run_dir", "name", "trainer.resume", "trainer.max_steps", "trainer.cpu_budget_s",
                     "trainer.ckpt_every_steps", "trainer.eval_every_epochs", "trainer.allow_config_change",
                     "trainer.eval_only", "logger", "hardware.device", "hardware.dist_backend",
                     "hardware.num_threads", "data.num_workers", "data.root", "data.eval_batch_size",
                     "model.pretrained", "model.pretrained_ema")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flatten(value, f"{name}.") if isinstance(value, dict) and value else {name: value})
    return out


def resume_changes(saved: dict, now: dict) -> list[str]:
    """`key: saved -> now` for every resolved config value a resume changes, bar RESUME_MAY_CHANGE."""
    old, new = _flatten(saved), _flatten(now)
    free = lambda k: any(k == f or k.startswith(f + ".") for f in RESUME_MAY_CHANGE)  # noqa: E731
    missing = object()
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in sorted({*old, *new})
            if not free(k) and old.get(k, missing) != new.get(k, missing)]


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key. Called before anything expensive happens."""
    _check(cfg, "data.batch_size", lambda v: _int(v) and v > 0, "batch size must be a positive integer")
    _check(cfg, "data.eval_batch_size", lambda v: _int(v) and v > 0, "batch size must be a positive integer")
    _check(cfg, "data.num_workers", lambda v: _int(v) and v >= 0, "must be an integer >= 0")
    _check(cfg, "data.augment.repeats", lambda v: _int(v) and v >= 1, "repeated augmentation count must be >= 1")
    _check(cfg, "data.augment.label_smoothing", lambda v: _num(v) and 0 <= v < 1, "must lie in [0, 1)")
    _check(cfg, "data.augment.random_erasing", lambda v: _num(v) and 0 <= v <= 1, "is a probability, in [0, 1]")
    numbers = lambda v, low: (isinstance(v, (list, tuple, ListConfig)) and len(v) > 0  # noqa: E731
                              and all(_num(x) and math.isfinite(x) and x > low for x in v))
    _check(cfg, "data.mean", lambda v: numbers(v, -math.inf), "must be a list of numbers, one per input channel")
    _check(cfg, "data.std", lambda v: numbers(v, 0), "must be a list of positive numbers, one per input channel")
    if len(cfg.data.mean) != len(cfg.data.std):
        raise ConfigError(f"data.mean has {len(cfg.data.mean)} values and data.std {len(cfg.data.std)}: give one "
                          "of each per input channel")
    mixup = _get(cfg, "data.augment").get("mixup")
    if mixup:
        unknown = sorted(set(mixup) - {"mixup_alpha", "cutmix_alpha", "switch_prob", "prob"})
        if unknown:
            raise ConfigError(f"data.augment.mixup.{unknown[0]}: not a key (mixup_alpha, cutmix_alpha, switch_prob, "
                              "prob)")
        for key in mixup:
            alpha = key.endswith("_alpha")
            _check(cfg, f"data.augment.mixup.{key}", lambda v: _num(v) and v >= 0 and (alpha or v <= 1),  # noqa: B023
                   "must be >= 0 (0: off)" if alpha else "is a probability, in [0, 1]")
    try:  # the dataset's own keys: its builder checks them (data/base.py)
        builder = builder_from_config(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    _check(cfg, "trainer.epochs", lambda v: _int(v) and v > 0, "must be a positive integer")
    _check(cfg, "trainer.max_steps", lambda v: v is None or (_int(v) and v > 0), "must be null or a positive integer")
    _check(cfg, "trainer.cpu_budget_s", lambda v: v is None or (_num(v) and v > 0), "must be null or CPU-seconds > 0")
    _check(cfg, "trainer.ckpt_every_steps", lambda v: v is None or (_int(v) and v > 0), "must be null or > 0")
    _check(cfg, "trainer.eval_every_epochs", lambda v: _int(v) and v > 0, "must be a positive integer")
    _check(cfg, "trainer.ema_decay", lambda v: v is None or (_num(v) and 0 < v < 1), "must be null or in (0, 1)")
    _check(cfg, "trainer.allow_config_change", lambda v: isinstance(v, bool), "must be true or false")
    resume = _get(cfg, "trainer.resume")
    if resume not in (None, False, "auto") and not Path(str(resume)).is_file():
        raise ConfigError(f"trainer.resume={resume!r}: must be null, 'auto', or an existing checkpoint file")
    if _get(cfg, "trainer.eval_only") and not cfg.model.get("pretrained") and resume is None:
        raise ConfigError("trainer.eval_only=True: needs weights to evaluate: model.pretrained=<true|file|URL> "
                          "or trainer.resume=<train.py checkpoint>")
    if _get(cfg, "trainer.eval_only") and not cfg.model.get("pretrained") and resume == "auto" \
            and not resumes_from_checkpoint(cfg):  # nothing but random weights to score
        raise ConfigError(f"trainer.eval_only=true trainer.resume=auto: no checkpoint in "
                          f"{Path(str(cfg.get('run_dir') or '<run_dir>')) / 'checkpoints'} to evaluate; give "
                          "run_dir=<the run folder>, trainer.resume=<checkpoint file> or model.pretrained=<weights>")

    _check(cfg, "optim.lr", lambda v: v is None or (_num(v) and v > 0), "must be null (scaled from base_lr) or > 0")
    _check(cfg, "optim.base_lr", lambda v: _num(v) and v > 0, "must be > 0")
    _check(cfg, "optim.base_batch_size", lambda v: _int(v) and v > 0, "must be a positive integer")
    _check(cfg, "optim.weight_decay", lambda v: _num(v) and v >= 0, "must be >= 0")
    _check(cfg, "optim.clip_grad", lambda v: v is None or (_num(v) and v > 0), "must be null or > 0")
    _check(cfg, "schedule.warmup_epochs", lambda v: _num(v) and v >= 0, "must be >= 0")
    _check(cfg, "schedule.min_lr", lambda v: _num(v) and v >= 0, "must be >= 0")
    warmup, epochs = cfg.schedule.warmup_epochs, cfg.trainer.epochs
    if warmup >= epochs and not _get(cfg, "trainer.eval_only"):
        raise ConfigError(f"schedule.warmup_epochs={warmup} >= trainer.epochs={epochs}: the lr would still be warming "
                          "up when the run ends (never at its base value, never decayed); lower "
                          "schedule.warmup_epochs (the default is 20, for 300-epoch ImageNet runs)")

    _check(cfg, "hardware.device", lambda v: v in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda")
    _check(cfg, "hardware.precision", lambda v: v in ("auto", "fp32", "bf16", "fp16"),
           "must be auto, fp32, bf16 or fp16")
    _check(cfg, "hardware.dist_backend", lambda v: v in ("auto", "gloo", "nccl"), "must be auto, gloo or nccl")
    if cfg.hardware.device == "cpu" and cfg.hardware.dist_backend == "nccl":
        raise ConfigError("hardware.dist_backend='nccl': NCCL needs CUDA; use gloo with hardware.device=cpu")
    _check(cfg, "hardware.matmul_precision", lambda v: v in ("highest", "high", "medium"),
           "must be highest (full fp32), high or medium (TF32 on GPUs that have it)")
    _check(cfg, "hardware.num_threads", lambda v: v is None or (_int(v) and v > 0), "must be null or > 0")
    _check(cfg, "hardware.processes", lambda v: _int(v) and v > 0, "must be a positive integer (local processes)")
    _check(cfg, "logger.mode", lambda v: v in ("offline", "online", "disabled"), "must be offline, online or disabled")
    _check(cfg, "logger.log_every_steps", lambda v: _int(v) and v > 0, "must be a positive integer")
    _check(cfg, "logger.num_roi_images", lambda v: _int(v) and v >= 0, "must be an integer >= 0")
    validate_model(cfg.model, weights_from_checkpoint=resumes_from_checkpoint(cfg))
    check_input_kind(cfg, builder)


def resumes_from_checkpoint(cfg: DictConfig) -> bool:
    """Whether the run starts from one of our checkpoints (trainer.resume=<file>, or auto with a
    last.pt in run_dir): its weights replace model.pretrained's, which is then neither read nor checked
    (a fine-tune resumes without its start file, and without a download for pretrained=true)."""
    resume = _get(cfg, "trainer.resume")
    if resume in (None, False):
        return False
    if resume == "auto":
        from .checkpoint import find_last

        run_dir = cfg.get("run_dir")
        return bool(run_dir) and find_last(Path(str(run_dir))) is not None
    return Path(str(resume)).is_file()


def input_kind(clips: bool) -> str:
    """How errors name what a model takes or a dataset yields."""
    return "clips" if clips else "images"


def check_input_kind(cfg: DictConfig, builder) -> None:
    """A model that takes clips needs a dataset of clips, an image model one of images (else the first
    batch fails with a shape error, after the data and model are built)."""
    if cfg.model.get("_target_") != "model.create_model":
        return
    from model.factory import list_models, takes_clips

    name = cfg.model.name
    takes = takes_clips(name)
    if takes == builder.yields_clips:
        return
    models = [m for m in list_models() if takes_clips(m) == builder.yields_clips]
    datasets = [f"data={n}" for n, clips in dataset_kinds().items() if clips == takes]
    takes, yields = input_kind(takes), input_kind(builder.yields_clips)
    raise ConfigError(f"model={name} takes {takes} but data={cfg.data.get('name')} yields {yields}: pick a model "
                      f"for {yields} ({', '.join(models)}) or a dataset of {takes} ({', '.join(datasets) or 'none'})")


def dataset_kinds() -> dict[str, bool]:
    """conf/data/<name>.yaml -> whether its builder yields clips."""
    import importlib

    kinds = {}
    for path in sorted((Path(__file__).resolve().parents[1] / "conf" / "data").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if isinstance(target, str) and "." in target:
            module, _, cls = target.rpartition(".")
            kinds[path.stem] = getattr(getattr(importlib.import_module(module), cls, None), "yields_clips", False)
    return kinds


def validate_model(cfg: DictConfig, weights_from_checkpoint: bool = False) -> None:
    """model._target_ names a callable; through model.create_model, the name, every override and
    `pretrained` (unless `weights_from_checkpoint`: a resume's weights are the checkpoint's) are
    checked, then the model is built on the meta device (no memory, no weights read), so a value its
    constructor refuses (`+model.num_tokens=0`) stops here, before any rank starts."""
    target = cfg.get("_target_")
    if not isinstance(target, str):
        raise ConfigError(f"model._target_={target!r}: must name the model factory (model.create_model)")
    if target != "model.create_model":
        return
    import torch

    from model.factory import check_model_args

    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
    if weights_from_checkpoint:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "pretrained_ema")}
    try:
        cls, model_kwargs = check_model_args(**kwargs)  # (the constructor's arguments: pretrained is not one)
        with torch.device("meta"):
            cls(**model_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model: {e}") from None
