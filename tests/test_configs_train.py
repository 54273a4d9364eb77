"""Every config composes, validates and instantiates; bad values fail at start naming the key."""
from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from model.factory import takes_clips
from train_helpers import CONF, TINY_MNIST, TINY_MODEL, compose_cfg, make_fake_imagenet, run_train
from training.config import ConfigError, dataset_kinds, register_resolvers, resolve_hardware, validate

register_resolvers()

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
HARDWARE = sorted(p.stem for p in (CONF / "hardware").glob("*.yaml"))


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    return make_fake_imagenet(tmp_path_factory.mktemp("imagenet"))


def build(cfg, num_classes, in_chans):
    return instantiate(cfg.model, num_classes=num_classes, in_chans=in_chans)


def test_default_is_nano_on_cluttered_mnist_on_cpu():
    cfg = compose_cfg([])
    validate(cfg)
    assert cfg.model.name == "sparseformer_nano" and cfg.data.name == "cluttered_mnist"
    assert cfg.logger.mode == "offline"
    # the dataset's recipe sets the training schedule
    recipe = OmegaConf.load(CONF / "recipe/cluttered_mnist.yaml")
    assert cfg.trainer.epochs == recipe.trainer.epochs == 10 and cfg.optim.lr == recipe.optim.lr
    # two local ranks of 32 canvases: the global batch the schedule was tuned for
    assert cfg.hardware.processes == 2 and cfg.data.batch_size * cfg.hardware.processes == 64
    if not torch.cuda.is_available():
        assert resolve_hardware(cfg.hardware) == ("cpu", "fp32", "gloo")
    model = instantiate(cfg.model, num_classes=10, in_chans=1)
    assert model(torch.zeros(2, 1, 100, 100)).shape == (2, 10)


@pytest.mark.parametrize("data", ["cluttered_mnist", "moving_digits"])
def test_cpu_demo_recipes_start_on_a_one_gpu_machine(data, monkeypatch):
    """The embedded demos' recipes run two gloo ranks on a CPU; on a machine with one GPU (device=auto
    picks it) they become one rank of the same global batch instead of asking for two GPUs. Pre-Ampere
    GPUs get fp16: torch's bf16 check counts slow emulation as support unless asked not to."""
    cpu = compose_cfg([f"data={data}", "hardware=cpu"])
    assert (cpu.hardware.processes, cpu.data.batch_size) == (2, 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    for overrides in ([f"data={data}"], [f"data={data}", "hardware=gpu"]):
        cfg = compose_cfg(overrides)
        validate(cfg)
        assert (cfg.hardware.processes, cfg.data.batch_size) == (1, 64), overrides
        assert resolve_hardware(cfg.hardware) == ("cuda", "fp16" if cfg.hardware.precision == "auto" else "bf16",
                                                  "nccl")
    assert compose_cfg([f"data={data}", "hardware.processes=4"]).hardware.processes == 4


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("data", ["cluttered_mnist", "imagenet", "moving_digits"])
def test_every_model_with_every_dataset(model_name, data, imagenet_root):
    cfg = compose_cfg([f"model={model_name}", f"data={data}", f"data.root={imagenet_root}"] if data == "imagenet"
                      else [f"model={model_name}", f"data={data}"])
    if takes_clips(model_name) != (data == "moving_digits"):  # a clip model on images, or the reverse
        with pytest.raises(ConfigError, match=f"model={model_name} takes .* but data={data} yields"):
            validate(cfg)
        return
    validate(cfg)
    # where a (data, model) specialisation changes the model's keys, the result must run on the canvases
    # (T/S/B are built by the experiment tests)
    if data == "cluttered_mnist" and (CONF / "data_model" / f"{data}_{model_name}.yaml").is_file():
        model = build(cfg, 10, 1).eval()
        size = cfg.data.canvas_size
        with torch.no_grad():
            assert model(torch.zeros(1, 1, size, size)).shape == (1, 10)


@pytest.mark.parametrize("hardware", HARDWARE)
def test_every_hardware(hardware):
    cfg = compose_cfg([f"hardware={hardware}"])
    validate(cfg)


def test_there_are_imagenet_experiments_for_t_s_b():
    assert {"sparseformer_t_imagenet", "sparseformer_s_imagenet", "sparseformer_b_imagenet"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment(experiment, imagenet_root):
    root = [f"data.root={imagenet_root}"] if "imagenet" in experiment or "kinetics" in experiment else []
    cfg = compose_cfg([f"experiment={experiment}", *root])
    validate(cfg)
    if experiment.endswith("_kinetics"):  # inflated from the released ImageNet weights (not downloaded here)
        variant = experiment.removesuffix("_kinetics")
        assert cfg.model.name == variant and cfg.model.pretrained is True and cfg.name == experiment
        assert cfg.data.num_frames == 16 and cfg.data.test_clips * cfg.data.test_crops == 15
        model = instantiate(cfg.model, num_classes=400, in_chans=3, pretrained=False)
        assert model.replicates == 4 and model.ndim == 3
        return
    in_chans = 1 if cfg.data.name == "cluttered_mnist" else 3
    model = build(cfg, 1000, in_chans)
    if experiment.endswith("_imagenet"):  # the paper's recipe (docs/MODEL.md "Training recipe")
        variant = experiment.removesuffix("_imagenet")
        assert cfg.model.name == variant
        assert cfg.trainer.epochs == 300 and cfg.schedule.warmup_epochs == 20
        assert cfg.optim.base_lr * 1024 / cfg.optim.base_batch_size == pytest.approx(1e-3)
        assert cfg.optim.weight_decay == 0.05 and cfg.optim.clip_grad == 5.0
        assert cfg.trainer.ema_decay == 0.9999 and cfg.data.augment.repeats == 3
        assert cfg.data.augment.mixup.mixup_alpha == 0.8 and cfg.data.augment.mixup.cutmix_alpha == 1.0
        assert cfg.data.augment.label_smoothing == 0.1 and cfg.data.augment.random_erasing == 0.25
        rate = {"sparseformer_t": 0.2, "sparseformer_s": 0.3, "sparseformer_b": 0.4}[variant]  # the variant's
        assert model.drop_path_rates[-1] == pytest.approx(rate)
        assert cfg.name == experiment and cfg.seed == 0  # _self_ first: train.yaml's name: null does not win
        assert cfg.hardware.precision == ("fp32" if variant == "sparseformer_b" else "auto")
        assert cfg.data.batch_size == 128
        expected = {"sparseformer_t": 31_522_212, "sparseformer_s": 47_575_056, "sparseformer_b": 81_076_996}[variant]
        assert sum(p.numel() for p in model.parameters()) == expected


def test_a_bigger_model_on_cluttered_mnist_gets_the_data_recipe():
    """model=sparseformer_t on the default data trains the data's 10 epochs, not ImageNet's 300."""
    cfg = compose_cfg(["model=sparseformer_t"])
    validate(cfg)
    assert cfg.trainer.epochs == 10 and cfg.data.batch_size == 32 and cfg.optim.lr == 2e-3
    assert compose_cfg(["data=imagenet", "model=sparseformer_t"]).trainer.epochs == 300


def test_an_experiment_sets_name_seed_and_run_dir(tmp_path):
    """train.yaml's own values come first in its defaults list (_self_), so an experiment's win."""
    import shutil

    conf = shutil.copytree(CONF, tmp_path / "conf")
    (conf / "experiment" / "pinned.yaml").write_text(
        "# @package _global_\nname: pinned_run\nseed: 123\nrun_dir: /tmp/pinned\ntrainer:\n  epochs: 3\n")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=pinned"])
    assert (cfg.name, cfg.seed, cfg.run_dir, cfg.trainer.epochs) == ("pinned_run", 123, "/tmp/pinned", 3)
    # and the command line still wins over the experiment
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=pinned", "seed=7", "name=mine"])
    assert (cfg.name, cfg.seed) == ("mine", 7)


def test_model_configs_hold_only_the_name():
    """Widths live in the model code (VARIANTS): a model config names the variant, nothing more."""
    for path in (CONF / "model").glob("*.yaml"):
        assert set(OmegaConf.load(path)) == {"_target_", "name", "pretrained"}, path.name
    for group in ("optim", "schedule"):  # no dead keys
        assert "name" not in OmegaConf.load(CONF / group / f"{'adamw' if group == 'optim' else 'cosine'}.yaml")


# data configs that are drafts, not yet wired to a builder (the video datasets); wiring one removes it here
UNWIRED_DATA = set()


def test_every_data_config_names_a_builder_that_checks_its_keys(imagenet_root):
    from data import COMMON_KEYS, DatasetBuilder, builder_from_config

    paths = sorted((CONF / "data").glob("*.yaml"))
    assert {p.stem for p in paths if "_target_" not in OmegaConf.load(p)} == UNWIRED_DATA
    for path in (p for p in paths if p.stem not in UNWIRED_DATA):
        needs_root = path.stem in ("imagenet", "kinetics")  # (kinetics' check only looks for the folder)
        cfg = compose_cfg([f"data={path.stem}", f"data.root={imagenet_root}"] if needs_root else [f"data={path.stem}"])
        builder = builder_from_config(cfg.data)
        assert isinstance(builder, DatasetBuilder) and set(COMMON_KEYS) <= set(cfg.data)
        bad = OmegaConf.merge(OmegaConf.to_container(cfg.data, resolve=True), {"no_such_key": 1})
        with pytest.raises(ValueError, match=r"data\.no_such_key: not a key of"):
            builder_from_config(bad)


def test_a_new_dataset_is_one_module_and_one_yaml(tmp_path, monkeypatch):
    """The plug-in protocol end to end: a builder module on the path and a data YAML naming it are
    enough for validation and build_data; its own check names its key."""
    (tmp_path / "toy_data.py").write_text(
        "from dataclasses import dataclass\n"
        "import torch\n"
        "from data.base import DatasetBuilder, InputSpec, Splits, expect\n"
        "class Items(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 12\n"
        "    def __getitem__(self, key): return torch.full((2, 8, 8), key[0], dtype=torch.uint8), key[0] % 3\n"
        "@dataclass\n"
        "class ToyBuilder(DatasetBuilder):\n"
        "    size: int = 8\n"
        "    def check(self): expect(self.size == 8, 'size', self.size, 'must be 8')\n"
        "    def build(self): return Splits(Items(), Items(), InputSpec(3, 2, self.size))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from data import InputSpec, build_data

    cfg = compose_cfg([])
    toy = OmegaConf.create({"_target_": "toy_data.ToyBuilder", "name": "toy", "batch_size": 4, "eval_batch_size": 6,
                            "num_workers": 0, "mean": [0.5, 0.5], "std": [0.5, 0.5], "size": 8,
                            "augment": {"randaugment": None, "random_erasing": 0.0, "mixup": None,
                                        "label_smoothing": 0.0, "repeats": 1}})
    cfg.data = toy
    validate(cfg)
    data = build_data(cfg.data)
    assert data.spec.model_kwargs() == {"num_classes": 3, "in_chans": 2} and data.steps_per_epoch == 3
    assert InputSpec(8, 1, 64, frames=8).model_kwargs() == {"num_classes": 8, "in_chans": 1}  # sizes: data_model
    x, y, skipped = next(iter(data.train_loader))
    assert x.shape == (4, 2, 8, 8) and skipped == 0
    cfg.data.size = 9
    with pytest.raises(ConfigError, match=r"data\.size=9: must be 8"):
        validate(cfg)
    cfg.data.size, cfg.data.mean, cfg.data.std = 8, [0.5], [0.5]  # one value for a 2-channel dataset
    with pytest.raises(ValueError, match=r"data.mean/std have 1 values but data=toy has 2 input channel"):
        build_data(cfg.data)


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "experiment=sparseformer_s_imagenet"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert "SlurmLauncher" in launcher._target_
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=-4", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.max_steps=-1", "trainer.max_steps"),
    ("trainer.resume=/nonexistent/last.pt", "trainer.resume"),
    ("logger.mode=sometimes", "logger.mode"),
    ("hardware.precision=fp8", "hardware.precision"),
    ("hardware.matmul_precision=tf32", "hardware.matmul_precision"),
    ("trainer.eval_only=true", "trainer.eval_only"),
    ("trainer.allow_config_change=maybe", "trainer.allow_config_change"),
    ("trainer.epochs=5 schedule.warmup_epochs=5", "schedule.warmup_epochs=5 >= trainer.epochs=5"),
    ("data.canvas_size=20", "data.canvas_size"),
    ("+data.canvas=64", "data.canvas"),
    ("+model.num_tokenz=3", "num_tokenz"),
    ("model.pretrained=/nonexistent/weights.pth", "pretrained"),
    ("model=sparseformer_nano model.pretrained=true", "sparseformer_nano: no released weights"),
    ("+model.pretrained_ema=true", "pretrained_ema=true takes the EMA weights of `pretrained`"),
    ("data.std=[0.0]", "data.std"),
    ("data.mean=[0.5,0.5]", "data.mean has 2 values and data.std 1"),
    ("data=imagenet data.augment.mixup.prob=2.0", "data.augment.mixup.prob"),
    ("data=imagenet data.augment.mixup.cutmix_alpha=-1", "data.augment.mixup.cutmix_alpha"),
    ("data=imagenet +data.augment.mixup.alpha=1", "data.augment.mixup.alpha: not a key"),
    # values the model's constructor refuses: built on the meta device at start, before any rank
    ("+model.num_tokens=0", "model: SparseFormer: num_tokens must be a positive integer, got 0"),
    ("model=videosparseformer_nano data=moving_digits +model.replicates=0", "replicates must be a positive integer"),
    ("model=deit_tiny +model.num_heads=5", "model: DeiT: embed_dim=192 must be divisible by num_heads=5"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(override.split()))


def test_imagenet_without_root_names_the_key(monkeypatch, tmp_path):
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"data\.root.*IMAGENET_ROOT"):
        validate(compose_cfg(["data=imagenet"]))
    with pytest.raises(ConfigError, match=rf"data\.root=.*{tmp_path.name}.*train"):
        validate(compose_cfg(["data=imagenet", f"data.root={tmp_path}"]))


def test_imagenet_root_from_environment(monkeypatch, imagenet_root):
    monkeypatch.setenv("IMAGENET_ROOT", str(imagenet_root))
    cfg = compose_cfg(["data=imagenet"])
    validate(cfg)
    assert cfg.data.root == str(imagenet_root)


def test_unknown_group_option_fails_naming_the_group():
    with pytest.raises(ConfigCompositionException, match="data"):
        compose_cfg(["data=cifar"])


def test_command_line_errors_reach_the_user(tmp_path):
    """The real CLI: non-zero exit and a message with the key and the reason, before any training."""
    res = run_train(["data.batch_size=-1", f"run_dir={tmp_path / 'run'}", *TINY_MODEL, *TINY_MNIST[1:]], timeout=120)
    assert res.returncode != 0
    assert "data.batch_size=-1: batch size must be a positive integer" in res.stderr
    res = run_train(["data=cifar", f"run_dir={tmp_path / 'run'}"], timeout=120)
    assert res.returncode != 0 and "data/cifar" in res.stderr and "cluttered_mnist" in res.stderr


def test_each_dataset_brings_its_default_model():
    """data=<name> alone trains that dataset's default model (conf/default_model/); model=<name> replaces it."""
    expected = {"cluttered_mnist": "sparseformer_nano", "moving_digits": "videosparseformer_nano",
                "imagenet": "sparseformer_t", "kinetics": "videosparseformer_t"}
    assert {p.stem for p in (CONF / "default_model").glob("*.yaml")} == set(expected)
    for data, name in expected.items():
        assert compose_cfg([f"data={data}"]).model.name == name
    assert compose_cfg(["data=moving_digits", "model=framewise_sparseformer_nano"]).model.name == \
        "framewise_sparseformer_nano"
    assert compose_cfg(["model=deit_small"]).model.img_size == 100  # data_model still applies


@pytest.mark.parametrize("repeats, world, warns", [(3, 1, True), (2, 2, False), (1, 1, False)])
def test_repeated_augmentation_on_fewer_ranks_than_repeats_warns(repeats, world, warns, caplog):
    """data.augment.repeats > ranks puts an item's copies on one rank, mostly in one batch: said at build."""
    from data import build_data

    cfg = compose_cfg(["data.train_samples_per_epoch=32", "data.test_samples=8", "data.canvas_size=40",
                       "data.num_clutter=2", "data.num_workers=0", f"data.augment.repeats={repeats}"])
    with caplog.at_level("WARNING", logger="data"):
        build_data(cfg.data, world_size=world, rank=0)
    assert ("a rank gets several copies of an item in a row" in caplog.text) == warns


def test_a_resume_keeps_the_runs_first_hydra_config(tmp_path, monkeypatch):
    """hydra.output_subdir: a resume into a run folder that has .hydra/config.yaml writes its own to
    .hydra/resume-<UTC>/, also under torchrun with run_dir=null (the folder is the rendezvous'); a
    new run writes .hydra; ranks other than 0 write nothing."""
    from training.config import output_subdir_resolver

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    (tmp_path / "outputs" / "torchrun" / "job7" / ".hydra").mkdir(parents=True)
    (tmp_path / "outputs" / "torchrun" / "job7" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    assert output_subdir_resolver("auto", None).startswith(".hydra/resume-")
    assert output_subdir_resolver("auto", str(tmp_path / "elsewhere")) == ".hydra"  # a new folder
    assert output_subdir_resolver(None, None) == ".hydra"
    monkeypatch.setenv("RANK", "1")
    assert output_subdir_resolver("auto", None) is None


def test_each_dataset_says_whether_it_yields_clips():
    """`yields_clips` (checked against the model at start) agrees with the transform the builder uses."""
    from data.base import builder_from_config
    from data.video_augment import VideoBatchTransform

    kinds = dataset_kinds()
    assert kinds == {"cluttered_mnist": False, "imagenet": False, "kinetics": True, "moving_digits": True}
    for name in ("cluttered_mnist", "moving_digits"):
        builder = builder_from_config(compose_cfg([f"data={name}"]).data)
        assert builder.yields_clips == kinds[name] == (builder.transform_class() is VideoBatchTransform)
