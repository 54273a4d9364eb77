"""Every conf/model/*.yaml composes through Hydra and instantiates the registered model."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import model

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_every_registered_model_has_a_config():
    assert {p.stem for p in (CONF / "model").glob("*.yaml")} == set(model.list_models())


@pytest.mark.parametrize("name", model.list_models())
def test_model_config_instantiates_the_registered_variant(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}"])
    built = instantiate(cfg.model)
    reference = model.create_model(name)
    assert type(built) is type(reference)
    assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    if hasattr(reference, "drop_path_rates"):
        assert built.drop_path_rates == reference.drop_path_rates


def test_model_config_overrides_reach_the_model():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=["+model=sparseformer_t", "+model.num_tokens=16", "+model.cortex_depth=2"])
    built = instantiate(cfg.model)
    assert built.num_tokens == 16 and len(built.cortex) == 2
