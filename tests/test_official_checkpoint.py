"""Faithfulness to the authors' code through the checkpoint converter (../shared/fixtures)."""
import json

import pytest
import torch

import model
from model.sparseformer import convert_official_state_dict, export_official_state_dict


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return torch.load(fixtures_dir / "official_v1_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def released_keys(fixtures_dir):
    return json.loads((fixtures_dir / "official_v1_checkpoint_keys.json").read_text())


def test_eval_outputs_match_the_authors_code(fixture):
    m = model.load_official_checkpoint(fixture["state_dict"], fixture["config"], backend="torch").eval()
    with torch.no_grad():
        out = m(fixture["input"], return_aux=True)
    assert rel(out.logits, fixture["logits"]) <= 1e-5
    assert rel(out.rois[-1], fixture["roi"].transpose(0, 1)) <= 1e-5  # fixtures are (tokens, batch, dim)
    assert rel(out.embedding, fixture["embedding"].transpose(0, 1)) <= 1e-5


def test_train_gradients_match_the_authors_code(fixture):
    m = model.load_official_checkpoint(fixture["state_dict"], fixture["config"], backend="torch").train()
    x = fixture["input"].clone().requires_grad_(True)
    logits = m(x)
    assert rel(logits, fixture["train_logits"]) <= 1e-5
    (logits * torch.linspace(-1, 1, 1000)).sum().backward()
    expected = convert_official_state_dict(fixture["grads"], m)
    params = dict(m.named_parameters())
    assert set(expected) == set(params)
    errors = {k: rel(params[k].grad, g) for k, g in expected.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{worst}: {errors[worst]:.2e}"
    assert rel(x.grad, fixture["input_grad"]) <= 1e-4


def test_variant_is_inferred_from_shapes(fixture):
    m = model.load_official_checkpoint(fixture["state_dict"])
    assert (m.num_tokens, m.num_points, len(m.cortex)) == (16, 16, 2)
    with torch.no_grad():
        assert rel(m.eval()(fixture["input"]), fixture["logits"]) <= 1e-5


@pytest.mark.parametrize("wrapper", ["model", "model_ema", "state_dict", "ddp"])
def test_wrapped_checkpoint_files_load(fixture, tmp_path, wrapper):
    state = fixture["state_dict"]
    if wrapper == "ddp":
        obj = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    else:
        obj = {wrapper: state, "optimizer": {}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    m = model.load_official_checkpoint(path, fixture["config"]).eval()
    with torch.no_grad():
        assert rel(m(fixture["input"]), fixture["logits"]) <= 1e-5


def test_unplaced_and_missing_keys_are_listed(fixture):
    state = dict(fixture["state_dict"])
    state["layers.0.surprise.weight"] = torch.zeros(3)
    del state["head.norm.bias"]
    with pytest.raises(ValueError) as err:
        model.load_official_checkpoint(state, fixture["config"])
    assert "layers.0.surprise.weight" in str(err.value) and "head.norm.bias" in str(err.value)


def test_export_round_trips_to_the_authors_layout(fixture):
    m = model.load_official_checkpoint(fixture["state_dict"], fixture["config"])
    exported = export_official_state_dict(m)
    assert set(exported) == set(fixture["state_dict"])
    for k, v in exported.items():
        assert torch.equal(v, fixture["state_dict"][k]), k


@pytest.mark.parametrize("name", ["sparseformer_t", "sparseformer_s", "sparseformer_b"])
def test_every_released_key_and_shape_maps(released_keys, name):
    entry = released_keys[name]
    state = {k: torch.empty(shape) for k, shape in entry["state_dict"].items()}
    for config in (entry["config"], None, name):
        m = model.load_official_checkpoint(state, config)
        assert sum(p.numel() for p in m.parameters()) == entry["params"]
    ours = model.create_model(name)
    assert set(export_official_state_dict(ours)) == set(entry["state_dict"])
    assert {k: list(v.shape) for k, v in export_official_state_dict(ours).items()} == entry["state_dict"]


def test_not_a_checkpoint_is_a_clear_error():
    with pytest.raises(ValueError, match="no state dict found"):
        model.load_official_checkpoint({"epoch": 3, "optimizer": {}})
    with pytest.raises(ValueError, match="unknown SparseFormer variant"):
        model.load_official_checkpoint({"x": torch.zeros(1)}, "sparseformer_q")
