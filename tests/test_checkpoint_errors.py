"""Every bad checkpoint gets one line naming the file and what it is; nothing is unpickled beyond
tensors; our own train.py checkpoint loads through load_official_checkpoint too."""
from __future__ import annotations

import os

import pytest
import torch

import model


def _write(kind: str, path):
    if kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        torch.save({"w": torch.zeros(1000)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickled module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "unrelated state dict":
        torch.save({"foo.weight": torch.zeros(3)}, path)
    return path


@pytest.mark.parametrize("kind, says", [
    ("random bytes", "not a PyTorch checkpoint"),
    ("truncated", "truncated or corrupt"),
    ("pickled module", "holds pickled Python objects (torch.nn.modules.linear.Linear)"),
    ("unrelated state dict", "not a SparseFormer state dict"),
])
def test_bad_checkpoint_is_one_line_naming_the_file(tmp_path, kind, says):
    path = _write(kind, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        model.load_official_checkpoint(path)
    message = str(err.value)
    assert message.startswith(str(path)) and says in message and "\n" not in message


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint file"):
        model.load_official_checkpoint(tmp_path / "absent.pt")


def test_pickled_module_is_never_executed(tmp_path, monkeypatch):
    """weights_only: the file's GLOBAL is refused, not imported and called."""
    path = _write("pickled module", tmp_path / "m.pt")
    calls = []
    monkeypatch.setattr(torch.nn.Linear, "__setstate__", lambda self, state: calls.append(state), raising=False)
    with pytest.raises(ValueError):
        model.load_official_checkpoint(path)
    assert calls == []


def test_own_train_checkpoint_loads_through_load_official_checkpoint(tmp_path):
    m = model.create_model("sparseformer_nano", num_classes=10, num_tokens=4, num_points=4, conv_dim=8,
                           focusing_dim=16, cortex_dim=32, cortex_depth=1, num_heads=4)
    cfg = {"model": {"_target_": "model.create_model", "name": "sparseformer_nano", "pretrained": False,
                     "num_classes": 10, "num_tokens": 4, "num_points": 4, "conv_dim": 8, "focusing_dim": 16,
                     "cortex_dim": 32, "cortex_depth": 1, "num_heads": 4}}
    torch.save({"model": m.state_dict(), "step": 7, "config": cfg, "ema": None}, tmp_path / "last.pt")
    loaded = model.load_official_checkpoint(tmp_path / "last.pt")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values(), strict=True))


@pytest.mark.parametrize("name, says", [("sparseformer_nano", "create_model('sparseformer_<t|s|b|nano>'"),
                                        ("videosparseformer_nano", "create_model('videosparseformer_<t|s|b|nano>'")])
def test_a_bare_state_dict_of_ours_says_how_to_load_it(tmp_path, name, says):
    """`torch.save(model.state_dict())` of our own models holds no architecture: the error says which call
    loads it (it was 'cannot infer the variant ... NoneType has no attribute shape')."""
    path = tmp_path / "weights.pt"
    torch.save(model.create_model(name).state_dict(), path)
    with pytest.raises(ValueError, match="bare state dict of this repo's own layout") as err:
        model.load_official_checkpoint(path)
    assert str(err.value).startswith(str(path)) and says in str(err.value)
    assert model.create_model(name, pretrained=str(path)).state_dict().keys() == torch.load(path).keys()


def test_weights_of_another_model_name_the_model_they_are(tmp_path):
    """A train.py checkpoint stores its model's name: loading it into another model says so first
    (before the list of keys that do not fit)."""
    path = tmp_path / "last.pt"
    trained = model.create_model("videosparseformer_nano", in_chans=1)
    torch.save({"model": trained.state_dict(), "step": 1, "config": {"model": {"name": "videosparseformer_nano"}}},
               path)
    with pytest.raises(ValueError, match=r"^pretrained weights .* are a train.py checkpoint of videosparseformer_nano, "
                                         r"not vivit_nano: use model=videosparseformer_nano"):
        model.create_model("vivit_nano", pretrained=str(path))
