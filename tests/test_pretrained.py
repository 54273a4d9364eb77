"""create_model(name, pretrained=...): released weights through the torch hub cache (file:// URLs
stand in for the authors' release URLs), local files, the class-count and channel adaptations, and
the errors a user meets offline or with the wrong file."""
from __future__ import annotations

import logging
import urllib.request

import pytest
import torch

import model
from model import hub, sparseformer

# the architecture of ../shared/fixtures/official_v{1,2}_small.pt, on top of sparseformer_t
FIXTURE_ARCH = dict(num_tokens=16, num_points=16, focusing_dim=64, cortex_dim=128, cortex_depth=2, backend="torch")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture()
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache for the test (TORCH_HOME and torch.hub's own setting)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch_home" / "hub"


@pytest.fixture()
def released(fixtures_dir, monkeypatch):
    """sparseformer_t's registry entry pointed at the v2 fixture by a file:// URL, as if released."""
    url = (fixtures_dir / "official_v2_small.pt").as_uri()
    monkeypatch.setitem(sparseformer.RELEASED_WEIGHTS, "sparseformer_t", {"v2.0.0-refactor": url})
    return url


def test_the_registry_holds_the_authors_release_urls():
    base = "https://github.com/showlab/sparseformer/releases/download"
    for short, size in (("t", "tiny"), ("s", "small"), ("b", "base")):
        urls = sparseformer.RELEASED_WEIGHTS[f"sparseformer_{short}"]
        assert list(urls) == ["v2.0.0-refactor", "v1.0.0-imagenet"]  # True takes the library-layout file
        assert urls["v2.0.0-refactor"] == f"{base}/v2.0.0-refactor/sparseformer_v1_{size}_converted.pth"
        assert urls["v1.0.0-imagenet"] == f"{base}/v1.0.0-imagenet/sparseformer_{short}_imagenet1k.pth"


def test_pretrained_true_downloads_into_the_hub_cache_once(hub_dir, released, fixtures_dir, capfd, monkeypatch):
    m = model.create_model("sparseformer_t", pretrained=True, **FIXTURE_ARCH).eval()
    cached = hub_dir / "checkpoints" / "official_v2_small.pt"
    assert cached.is_file() and cached.read_bytes() == (fixtures_dir / "official_v2_small.pt").read_bytes()
    assert "100%" in capfd.readouterr().err  # the progress bar
    ref = torch.load(fixtures_dir / "official_v2_small.pt", weights_only=True)
    with torch.no_grad():
        assert rel(m(ref["input"]), ref["v1_logits"]) <= 1e-5
    # the second time no download happens at all
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded twice"))
    model.create_model("sparseformer_t", pretrained=True, **FIXTURE_ARCH)


def test_a_prefilled_cache_needs_no_network(hub_dir, fixtures_dir, monkeypatch):
    url = "https://example.invalid/releases/sparseformer_v1_tiny_converted.pth"
    monkeypatch.setitem(sparseformer.RELEASED_WEIGHTS, "sparseformer_t", {"v2.0.0-refactor": url})
    (hub_dir / "checkpoints").mkdir(parents=True)
    (hub_dir / "checkpoints" / "sparseformer_v1_tiny_converted.pth").write_bytes(
        (fixtures_dir / "official_v2_small.pt").read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("network used"))
    m = model.create_model("sparseformer_t", pretrained=True, **FIXTURE_ARCH)
    assert m.num_tokens == 16


def test_offline_the_error_names_the_url_and_the_file_to_place(hub_dir, tmp_path, monkeypatch):
    url = (tmp_path / "not_downloadable" / "sparseformer_v1_tiny_converted.pth").as_uri()
    monkeypatch.setitem(sparseformer.RELEASED_WEIGHTS, "sparseformer_t", {"v2.0.0-refactor": url})
    with pytest.raises(RuntimeError) as err:
        model.create_model("sparseformer_t", pretrained=True, **FIXTURE_ARCH)
    message = str(err.value)
    assert url in message and str(hub_dir / "checkpoints" / "sparseformer_v1_tiny_converted.pth") in message
    assert "\n" not in message


def test_a_partial_download_never_counts_as_cached(hub_dir, released, monkeypatch):
    real_urlopen = urllib.request.urlopen

    class Dropped:
        """The real file's response, whose connection drops after the first chunk."""

        def __init__(self, *args, **kwargs):
            self.response, self.reads = real_urlopen(*args, **kwargs), 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.response.close()

        def info(self):
            return self.response.info()

        def read(self, n):
            self.reads += 1
            if self.reads > 1:
                raise ConnectionResetError("connection reset by peer")
            return self.response.read(n)

    monkeypatch.setattr(torch.hub, "urlopen", Dropped)
    with pytest.raises(RuntimeError, match="connection reset"):
        model.create_model("sparseformer_t", pretrained=True, **FIXTURE_ARCH)
    assert list((hub_dir / "checkpoints").iterdir()) == []  # neither the final name nor a temp file
    # a stale temp file of an older interrupted download is not the checkpoint either
    (hub_dir / "checkpoints" / "official_v2_small.pt.0123abcd.partial").write_bytes(b"half a file")
    monkeypatch.undo()
    monkeypatch.setenv("TORCH_HOME", str(hub_dir.parent))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setitem(sparseformer.RELEASED_WEIGHTS, "sparseformer_t", {"v2.0.0-refactor": released})
    assert model.create_model("sparseformer_t", pretrained=True, **FIXTURE_ARCH).num_tokens == 16
    assert (hub_dir / "checkpoints" / "official_v2_small.pt").is_file()


def test_path_url_and_release_tag(hub_dir, fixtures_dir, monkeypatch):
    v1, v2 = fixtures_dir / "official_v1_small.pt", fixtures_dir / "official_v2_small.pt"
    monkeypatch.setitem(sparseformer.RELEASED_WEIGHTS, "sparseformer_t",
                        {"v2.0.0-refactor": v2.as_uri(), "v1.0.0-imagenet": v1.as_uri()})
    ref = torch.load(v1, weights_only=True)
    for source in (str(v1), str(v2), v1.as_uri(), "v1.0.0-imagenet", "v2.0.0-refactor"):
        m = model.create_model("sparseformer_t", pretrained=source, **FIXTURE_ARCH).eval()
        with torch.no_grad():
            assert rel(m(ref["input"]), ref["logits"]) <= 1e-5, source
    with pytest.raises(ValueError, match="no such file"):
        model.create_model("sparseformer_t", pretrained=str(fixtures_dir / "nope.pth"))
    with pytest.raises(ValueError, match="deit_tiny: no released weights"):
        model.create_model("deit_tiny", pretrained=True)


def test_another_class_count_reinitialises_the_head_and_says_so(fixtures_dir, caplog):
    ref = torch.load(fixtures_dir / "official_v1_small.pt", weights_only=True)["state_dict"]
    torch.manual_seed(0)
    fresh = model.create_model("sparseformer_t", **FIXTURE_ARCH, num_classes=10)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="model.hub"):
        m = model.create_model("sparseformer_t", pretrained=str(fixtures_dir / "official_v1_small.pt"),
                               **FIXTURE_ARCH, num_classes=10)
    lines = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    assert lines == ["pretrained: the checkpoint has 1000 classes, the model 10: head.classifier re-initialised"]
    assert torch.equal(m.head.classifier.weight, fresh.head.classifier.weight)  # the model's own init
    assert torch.equal(m.head.norm.weight, ref["head.norm.weight"])  # the rest is the file's
    assert torch.equal(m.focusing.attn.in_proj_weight, ref["layers.0.attn.in_proj_weight"])


def test_a_grey_model_takes_the_rgb_stem_summed(fixtures_dir):
    ref = torch.load(fixtures_dir / "official_v1_small.pt", weights_only=True)
    m = model.create_model("sparseformer_t", pretrained=str(fixtures_dir / "official_v1_small.pt"),
                           **FIXTURE_ARCH, in_chans=1).eval()
    grey = ref["input"][:, :1]
    rgb = model.create_model("sparseformer_t", pretrained=str(fixtures_dir / "official_v1_small.pt"),
                             **FIXTURE_ARCH).eval()
    with torch.no_grad():  # a grey image through the summed stem = the same image as RGB through the original
        torch.testing.assert_close(m(grey), rgb(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_wrong_architecture_lists_the_mismatches(fixtures_dir):
    with pytest.raises(ValueError, match=r"shape mismatches.*token_embedding \(16, 64\) -> \(49, 256\)"):
        model.create_model("sparseformer_t", pretrained=str(fixtures_dir / "official_v1_small.pt"))


def test_own_deit_weights_round_trip(tmp_path):
    a = model.create_model("deit_tiny", img_size=32, patch_size=8, depth=1, num_classes=3)
    torch.save({"model": a.state_dict()}, tmp_path / "deit.pt")
    b = model.create_model("deit_tiny", img_size=32, patch_size=8, depth=1, num_classes=3,
                           pretrained=str(tmp_path / "deit.pt"))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_cached_path_and_url_detection():
    assert hub.is_url("file:///x/y.pth") and hub.is_url("https://a/b.pth") and not hub.is_url("/x/y.pth")
    assert hub.cached_path("https://host/a/b/w.pth?download=1").name == "w.pth"
    a, b = (hub.cached_path(f"https://host/run{r}/checkpoints/last.pt", unique=True) for r in "AB")
    assert a != b and a.name.endswith("-last.pt") and len(a.name) == len("12345678-last.pt")


def test_urls_with_the_same_file_name_never_share_a_cached_file(hub_dir, tmp_path, monkeypatch):
    """Two runs' .../checkpoints/last.pt by URL: each its own weights (the cache was keyed on the file
    name alone, so the second URL got the first one's file). A file:// URL is read where it is."""
    paths, made = {}, []
    for run in ("runA", "runB"):
        m = model.create_model("sparseformer_nano", num_tokens=4, num_points=4)
        paths[run] = tmp_path / run / "checkpoints" / "last.pt"
        paths[run].parent.mkdir(parents=True)
        torch.save(m.state_dict(), paths[run])
        made.append(m)

    def fake_download(url, dst, progress=True):  # http(s) served from tmp_path
        with open(dst, "wb") as f:
            f.write((tmp_path / url.split("example.invalid/", 1)[1]).read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    for source in ("https://example.invalid/{}/checkpoints/last.pt", f"file://{tmp_path}/{{}}/checkpoints/last.pt"):
        for run, expected in zip(paths, made, strict=True):
            got = model.create_model("sparseformer_nano", num_tokens=4, num_points=4, pretrained=source.format(run))
            assert torch.equal(got.token_embedding, expected.token_embedding), (source, run)
    assert not any(p.name == "last.pt" for p in (hub_dir / "checkpoints").iterdir())


def test_pretrained_ema_takes_the_ema_weights_of_our_checkpoint(tmp_path):
    """pretrained=<a train.py last.pt> takes its raw weights; pretrained_ema=true its EMA's; a file
    without an EMA is an error naming it, and pretrained_ema without pretrained is refused."""
    raw = model.create_model("sparseformer_nano", num_tokens=4, num_points=4)
    ema = model.create_model("sparseformer_nano", num_tokens=4, num_points=4)
    assert not torch.equal(raw.head.classifier.weight, ema.head.classifier.weight)
    path = tmp_path / "last.pt"
    torch.save({"model": raw.state_dict(), "ema": {"module": ema.state_dict(), "updates": 3}, "step": 3}, path)
    for use_ema, expected in ((False, raw), (True, ema)):
        got = model.create_model("sparseformer_nano", pretrained=str(path), pretrained_ema=use_ema,
                                 num_tokens=4, num_points=4)
        for (k, a), b in zip(got.state_dict().items(), expected.state_dict().values(), strict=True):
            assert torch.equal(a, b), (use_ema, k)
    torch.save({"model": raw.state_dict(), "ema": None, "step": 3}, path)
    with pytest.raises(ValueError, match="holds no EMA weights"):
        model.create_model("sparseformer_nano", pretrained=str(path), pretrained_ema=True, num_tokens=4, num_points=4)
    with pytest.raises(ValueError, match="pretrained_ema=true takes the EMA weights of `pretrained`"):
        model.create_model("sparseformer_nano", pretrained_ema=True)


def test_timms_state_dict_ema_is_an_ema_and_an_ema_only_file_says_so(tmp_path, caplog):
    """timm's train.py saves {state_dict, state_dict_ema}: pretrained_ema=true takes the second. A file
    with only model_ema loads those weights with a warning that they are an EMA's."""
    raw, ema = (model.create_model("sparseformer_nano", num_tokens=4, num_points=4) for _ in range(2))
    torch.save({"state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 3}, tmp_path / "t.pth")
    for use_ema, expected in ((False, raw), (True, ema)):
        got = model.create_model("sparseformer_nano", num_tokens=4, num_points=4, pretrained=str(tmp_path / "t.pth"),
                                 pretrained_ema=use_ema)
        assert torch.equal(got.token_embedding, expected.token_embedding), use_ema
    torch.save({"model_ema": ema.state_dict()}, tmp_path / "e.pth")
    with caplog.at_level("WARNING"):
        got = model.create_model("sparseformer_nano", num_tokens=4, num_points=4, pretrained=str(tmp_path / "e.pth"))
    assert torch.equal(got.token_embedding, ema.token_embedding)
    assert "under 'model_ema' only (an EMA): loading those" in caplog.text


def test_pretrained_on_the_meta_device_is_refused(tmp_path):
    """Built under torch.device("meta"), loading weights was a silent no-op (a warning per key, then
    'loaded pretrained weights')."""
    torch.save(model.create_model("sparseformer_nano", num_tokens=4, num_points=4).state_dict(), tmp_path / "w.pt")
    with torch.device("meta"), pytest.raises(ValueError, match="cannot be loaded into a model on the meta device"):
        model.create_model("sparseformer_nano", num_tokens=4, num_points=4, pretrained=str(tmp_path / "w.pt"))
