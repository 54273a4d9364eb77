"""visualize.py: config errors in one line, no folder left behind by them, the log beside the run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import visualize

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, says", [
    (["checkpoint={missing}"], "no such file"),
    (["checkpoint={ckpt}", "+model.num_tokens=9"], "+model.num_tokens=9: visualize.py reads no such key"),
    (["checkpoint={ckpt}", "num_images=0"], "num_images=0: must be a positive integer"),
    (["checkpoint={ckpt}"], "not a PyTorch checkpoint"),
    (["checkpoint={ckpt}", "out={missing}.png"], "does not exist"),
])
def test_config_errors_are_one_line_and_leave_no_folder(tmp_path, args, says):
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"\x00not a checkpoint" * 20)
    missing = tmp_path / "absent" / "checkpoints" / "last.pt"
    args = [a.format(ckpt=ckpt, missing=missing) for a in args]
    proc = subprocess.run([sys.executable, str(REPO / "visualize.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and lines == [lines[-1]] and lines[-1].startswith("config error:") and says in lines[-1]
    assert not (tmp_path / "absent").exists()  # no empty run folder for a mistyped path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written into the working directory


def test_log_goes_beside_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert visualize.log_dir_resolver(run / "checkpoints" / "last.pt") == str(run)
    assert visualize.log_dir_resolver(tmp_path / "sparseformer_t.pth") == str(tmp_path)


def test_weights_of_another_model_name_the_file(tmp_path):
    """A state dict visualize.py cannot draw (a DeiT's): the error names the file given, not 'state dict'."""
    import torch
    from omegaconf import OmegaConf

    import model

    path = tmp_path / "deit.pth"
    torch.save(model.create_model("deit_tiny", img_size=32, patch_size=8, depth=1).state_dict(), path)
    cfg = OmegaConf.create({"checkpoint": str(path), "use_ema": False, "data": {}})
    with pytest.raises(visualize.ConfigError, match=rf"^checkpoint='{path}': "):
        visualize.load_model(cfg)
