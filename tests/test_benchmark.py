"""benchmark.py: a 2-point sweep end to end (CSV / JSON / PNG / W&B files), the sweep's point
enumeration, and an out-of-memory point that is recorded while the sweep goes on."""
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import benchmark
from model.memory import saved_tensor_bytes

CONF = str(Path(benchmark.__file__).resolve().parent / "conf")


def config(*overrides, sweep="smoke"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="benchmark", overrides=[f"sweep={sweep}", "device=cpu", *overrides])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_point_sweep_writes_every_output(tmp_path):
    cfg = config("logger.mode=offline", f"accuracy_file={tmp_path / 'acc.csv'}")
    (tmp_path / "acc.csv").write_text("model,top1\nsparseformer_nano,70.0\ndeit_tiny,72.2\n")
    run_dir = tmp_path / "run"
    rows = benchmark.run(cfg, run_dir, progress=False)

    table = read_csv(run_dir / "results.csv")
    assert len(table) == len(rows) == 2
    required = ["model", "tokens", "resolution", "batch_size", "mode", "backend", "device", "precision",
                "throughput_img_s", "latency_ms", "peak_mem_mb", "params", "gmacs"]
    assert set(required) <= set(table[0])
    by_model = {r["model"]: r for r in table}
    assert set(by_model) == {"sparseformer_nano", "deit_tiny"}
    nano, deit = by_model["sparseformer_nano"], by_model["deit_tiny"]
    nano_tokens = benchmark.create_model("sparseformer_nano").num_tokens
    assert (nano["tokens"], deit["tokens"]) == (str(nano_tokens), str((64 // 16) ** 2 + 1))
    assert (nano["backend"], deit["backend"], nano["device"], nano["precision"]) == ("auto", "dense", "cpu", "fp32")
    for r in table:
        assert r["status"] == "ok" and r["resolution"] == "64" and r["batch_size"] == "2" and r["mode"] == "inference"
        for col in ("throughput_img_s", "latency_ms", "peak_mem_mb", "gmacs"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (r["model"], col, r[col])
    # params and MACs come from the models themselves
    assert int(nano["params"]) == sum(p.numel() for p in benchmark.create_model("sparseformer_nano").parameters())
    assert float(deit["gmacs"]) == pytest.approx(
        benchmark.count_flops(benchmark.create_model("deit_tiny", img_size=64), 64)["macs"] / 1e9
    )
    # peak memory at least holds the weights
    assert float(deit["peak_mem_mb"]) >= int(deit["params"]) * 4 / 2**20

    data = json.loads((run_dir / "results.json").read_text())
    assert [r["model"] for r in data["rows"]] == [r["model"] for r in table]
    assert data["meta"]["cpu_count"] >= 1 and "torch" in data["meta"]
    for png in ("throughput_vs_resolution.png", "throughput_vs_tokens.png", "accuracy_vs_throughput.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "sparseformer_nano / deit_tiny" in (run_dir / "summary.txt").read_text()
    assert list(run_dir.glob("wandb/offline-run-*")), "W&B's offline files belong in the run directory"


def test_out_of_memory_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    build = benchmark.build_model

    def build_with_oom(point, backend):
        m = build(point, backend)
        if point.model == "sparseformer_nano":
            def oom(*args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
            m.forward = oom
        return m

    monkeypatch.setattr(benchmark, "build_model", build_with_oom)
    cfg = config("logger.mode=disabled", "sweep.resolutions=[64,96]", "sweep.interleave=resolution")
    rows = benchmark.run(cfg, tmp_path, progress=False)
    status = {(r["model"], r["resolution"]): r["status"] for r in rows}
    assert status == {("sparseformer_nano", 64): "oom", ("sparseformer_nano", 96): "oom",
                      ("deit_tiny", 64): "ok", ("deit_tiny", 96): "ok"}
    table = read_csv(tmp_path / "results.csv")
    oom_rows = [r for r in table if r["status"] == "oom"]
    assert len(oom_rows) == 2 and all(r["throughput_img_s"] == "" for r in oom_rows)
    assert all(float(r["throughput_img_s"]) > 0 for r in table if r["status"] == "ok")
    assert not list(tmp_path.glob("wandb")), "logger.mode=disabled writes no W&B files"


def test_oom_in_a_timed_round_is_recorded_too(tmp_path, monkeypatch):
    timed = benchmark.Runner.timed
    calls = {"n": 0}

    def timed_then_oom(self, batch_size):
        if isinstance(self.model, benchmark.SparseFormer):
            calls["n"] += 1
            if calls["n"] > 1:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return timed(self, batch_size)

    monkeypatch.setattr(benchmark.Runner, "timed", timed_then_oom)
    rows = benchmark.run(config("logger.mode=disabled"), tmp_path, progress=False)
    assert {r["model"]: r["status"] for r in rows} == {"sparseformer_nano": "oom", "deit_tiny": "ok"}


def test_other_errors_are_not_swallowed(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark.Runner, "step", lambda self, b: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        benchmark.run(config("logger.mode=disabled"), tmp_path, progress=False)


def test_sweep_points_cover_resolutions_and_tokens():
    cfg = config()
    sweep = cfg.sweep
    sweep.models = ["sparseformer_t", "deit_small"]
    sweep.resolutions, sweep.tokens, sweep.token_resolution = [224, 512, 1024], [9, 49, 144], 224
    sweep.dense_max_resolution, sweep.modes, sweep.train_max_resolution = 512, ["inference", "train"], 224
    sweep.train_token_sweep = False
    points = benchmark.sweep_points(sweep)
    inference = {(p.model, p.tokens, p.resolution) for p in points if p.mode == "inference"}
    assert inference == {
        ("sparseformer_t", None, 224), ("sparseformer_t", 9, 224), ("sparseformer_t", 144, 224),
        ("sparseformer_t", None, 512), ("sparseformer_t", None, 1024),
        ("deit_small", None, 224), ("deit_small", None, 512),
    }  # 49 is T's default: measured once
    train = {(p.model, p.tokens, p.resolution) for p in points if p.mode == "train"}
    assert train == {("sparseformer_t", None, 224), ("deit_small", None, 224)}
    sweep.train_token_sweep = True
    train = {(p.model, p.tokens) for p in benchmark.sweep_points(sweep) if p.mode == "train"}
    assert train == {("sparseformer_t", None), ("sparseformer_t", 9), ("sparseformer_t", 144), ("deit_small", None)}
    sweep.grid = True
    grid = [p for p in benchmark.sweep_points(sweep) if p.mode == "inference" and p.model == "sparseformer_t"]
    assert len(grid) == 3 * 3
    sweep.models = ["resnet50"]
    with pytest.raises(ValueError, match="resnet50"):
        benchmark.sweep_points(sweep)


def test_every_sweep_config_composes():
    names = sorted(p.stem for p in (Path(CONF) / "sweep").glob("*.yaml"))
    assert {"cpu", "full", "smoke", "video"} <= set(names)
    for name in names:
        cfg = config(sweep=name)
        assert benchmark.sweep_points(cfg.sweep), name


def test_kernel_mode_runs_the_kernel_benchmarks(tmp_path, capsys):
    cfg = config("mode=kernels", "kernels.variants=[sparseformer_t]", "kernels.dtypes=[fp32]",
                 "kernels.batch_sizes=[1]", "kernels.passes=[fwd]", "kernels.repeats=1")
    rows = benchmark.run(cfg, tmp_path, progress=False)
    assert {(r["kernel"], r["impl"]) for r in rows} == {("sparse_sample", "reference"), ("adaptive_mix", "reference"),
                                                        ("sample_and_mix", "reference")}
    assert len(read_csv(tmp_path / "kernels.csv")) == 3
    assert json.loads((tmp_path / "kernels.json").read_text())["rows"][0]["time_ms"] > 0
    out = capsys.readouterr().out
    assert f"written to {tmp_path}/kernels.txt" in out  # says where its files went
    # no percent-of-floor on a CPU (the floors are a GPU's bandwidth): empty in the files, none printed
    assert all(r["pct_of_floor"] is None and r["floor_us"] is None
               for r in json.loads((tmp_path / "kernels.json").read_text())["rows"])


def test_training_rows_report_activation_memory(tmp_path):
    """Training points carry the bytes autograd saves for backward per image (deterministic: what one
    more image adds, the slope from batch 1); inference points have none."""
    cfg = config("logger.mode=disabled", "sweep.modes=[inference,train]", "sweep.models=[sparseformer_nano]")
    rows = benchmark.run(cfg, tmp_path, progress=False)
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["inference"]["saved_mib_per_img"] is None
    model = benchmark.create_model("sparseformer_nano").train()
    two, one = (saved_tensor_bytes(model, torch.randn(b, 3, 64, 64)) for b in (2, 1))
    expected = (two - one) / 2**20
    assert by_mode["train"]["saved_mib_per_img"] == pytest.approx(expected, rel=1e-6)


def test_memory_mode_measures_every_option(tmp_path):
    cfg = config("mode=memory", "memory.model=sparseformer_nano", "memory.resolution=32", "memory.batch_size=2",
                 "backend=torch")
    rows = benchmark.run(cfg, tmp_path, progress=False)
    assert [r["options"] for r in rows] == list(benchmark.MEMORY_OPTIONS)
    saved = [r["saved_mib_per_img"] for r in rows]
    assert saved == sorted(saved, reverse=True) and saved[0] > saved[-1] > 0
    assert rows[0]["step_time_vs_eager"] == 1.0 and all(r["step_ms"] > 0 for r in rows)
    assert len(read_csv(tmp_path / "memory.csv")) == 4 and "saved_mib_per_img" in (tmp_path / "memory.txt").read_text()


def test_video_points_run_side_by_side(tmp_path):
    """sweep.video: a VideoSparseFormer and the dense ViViT at two frame counts, one run, with clips/s,
    counted MACs per clip and the ratio line in the summary."""
    cfg = config("logger.mode=disabled", "sweep.models=[]", "sweep.video.models=[videosparseformer_nano,vivit_nano]",
                 "sweep.video.frames=[4,8]", "sweep.video.resolution=32", "sweep.video.reference=vivit_nano",
                 "sweep.video.tokens=[4]", "sweep.video.token_frames=4", "profile=true")
    rows = benchmark.run(cfg, tmp_path, progress=False)
    got = {(r["model"], r["tokens"], r["frames"]) for r in rows}
    vsf, vit = "videosparseformer_nano", "vivit_nano"
    assert got == {(vsf, 32, 4), (vsf, 32, 8), (vsf, 8, 4), (vit, 2 * 16 + 1, 4), (vit, 4 * 16 + 1, 8)}
    assert all(r["status"] == "ok" and r["throughput_img_s"] > 0 and r["gmacs"] > 0 for r in rows)
    macs = {(r["model"], r["frames"]): r["gmacs"] for r in rows if r["tokens"] in (32, 33, 65)}
    assert macs[("vivit_nano", 8)] > macs[("vivit_nano", 4)] and macs[("videosparseformer_nano", 8)] > \
        macs[("videosparseformer_nano", 4)]
    summary = (tmp_path / "summary.txt").read_text()
    assert "videosparseformer_nano (32 tokens) / vivit_nano" in summary
    # the ratio line carries the MAC ratio (the equal-efficiency bound) and both achieved rates
    line = next(x for x in summary.splitlines() if f"{vsf} (32 tokens) / {vit}" in x and " 8 frames" in x)
    mac_ratio = macs[("vivit_nano", 8)] / macs[("videosparseformer_nano", 8)]
    assert f"MACs {mac_ratio:.2f}x fewer" in line and "GMAC/s GEMM peak" in line
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["gemm_peak_gmacs_s"] > 0
    assert (tmp_path / "throughput_vs_frames.png").exists()
    # profile=true: one profiled step per point, named by its coordinates, the stem's conv among the ops
    profiles = sorted(p.name for p in (tmp_path / "profiles").iterdir())
    assert profiles == sorted(f"{m}_{t}tok_32px_{f}f_inference.txt" for m, t, f in got)
    assert "convolution" in (tmp_path / "profiles" / f"{vsf}_32tok_32px_8f_inference.txt").read_text()


@pytest.mark.parametrize("key", ["batch_size", "repeats"])
def test_zero_batch_size_or_repeats_is_a_clear_error(tmp_path, key):
    with pytest.raises(benchmark.SweepConfigError, match=f"sweep.{key}=0: must be a positive integer, got 0"):
        benchmark.run(config(f"sweep.{key}=0"), tmp_path, progress=False)
    assert not list(tmp_path.glob("*.csv"))


KEEPS_FREED = """
import ctypes, sys
import benchmark
from model.memory import saved_tensor_bytes
libc = ctypes.CDLL("libc.so.6")
if not hasattr(libc, "mallinfo2"):
    sys.exit(3)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "1":
    assert benchmark.keep_freed_memory()
blocks = [libc.malloc(int(sys.argv[2]) << 20) for _ in range(8)]
for b in blocks:
    libc.free(b)
print(libc.mallinfo2().arena >> 20)
"""


@pytest.mark.parametrize("block_mib", [40, 160])
def test_keep_freed_memory_keeps_freed_buffers_in_the_heap(block_mib):
    """The CPU sweep's allocator setting: 8 freed buffers of 40 MiB (above glibc's largest dynamic mmap
    threshold, so by default mapped and unmapped each time) or of 160 MiB (1.25 GiB in all, what a 1024 px
    batch frees) stay in the heap for the next call. (Its trim threshold was passed as 4 << 30, which
    ctypes wrapped to 0: the heap was trimmed on every free; at 1 GiB the 160 MiB case went back.)"""
    import subprocess
    import sys

    def heap_mib(tuned: bool) -> int:
        run = subprocess.run([sys.executable, "-c", KEEPS_FREED, "1" if tuned else "0", str(block_mib)],
                             capture_output=True, text=True, cwd=Path(benchmark.__file__).resolve().parent)
        if run.returncode == 3:
            pytest.skip("glibc without mallinfo2")
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    assert heap_mib(tuned=True) >= 8 * block_mib
    assert heap_mib(tuned=False) < 8 * block_mib  # glibc's own thresholds give them back


def test_training_step_peak_memory_counts_the_gradients_once():
    """The CPU peak of a training step reads the profiler's allocation events, which miss the frees of
    blocks allocated before the profiler started: the previous step's gradients (freed by zero_grad
    after the forward) were counted twice by the first measurement, not by a second one."""
    torch.manual_seed(0)
    m = benchmark.create_model("sparseformer_nano")
    runner = benchmark.Runner(m, "train", 2, 64, torch.device("cpu"), "fp32", seed=0)
    runner.step(2)
    first, second = runner.peak_memory_mb(2), runner.peak_memory_mb(2)
    grads_mib = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
    assert first == pytest.approx(second, abs=0.05 * grads_mib)
    # with no step before it (sweep.warmup=0) the gradients and AdamW's two moments are made by the
    # measurement's own unmeasured step: counted all the same (they were missed, 3x the weights)
    torch.manual_seed(0)
    fresh = benchmark.Runner(benchmark.create_model("sparseformer_nano"), "train", 2, 64, torch.device("cpu"), "fp32",
                             seed=0)
    assert fresh.peak_memory_mb(2) == pytest.approx(second, abs=0.05 * grads_mib)


def test_every_kind_of_registered_model_can_be_swept(tmp_path):
    """The CNN (no tokens, any size) among the image models, the frame-wise SparseFormer (the image
    model on each frame) among the video models: each built with only the arguments it has."""
    cfg = config("logger.mode=disabled", "sweep.models=[cnn_small,sparseformer_nano]", "sweep.reference=null",
                 "sweep.video.models=[framewise_sparseformer_nano,vivit_nano]", "sweep.video.frames=[4]",
                 "sweep.video.resolution=32", "sweep.video.reference=vivit_nano", "sweep.repeats=1")
    rows = benchmark.run(cfg, tmp_path, progress=False)
    by_model = {r["model"]: r for r in rows}
    assert set(by_model) == {"cnn_small", "sparseformer_nano", "framewise_sparseformer_nano", "vivit_nano"}
    assert all(r["status"] == "ok" and r["gmacs"] > 0 for r in rows)
    assert by_model["cnn_small"]["tokens"] is None and by_model["cnn_small"]["backend"] == "dense"
    framewise = by_model["framewise_sparseformer_nano"]
    assert framewise["tokens"] == benchmark.SPARSEFORMER_VARIANTS["sparseformer_nano"]["num_tokens"]
    assert framewise["backend"] == "auto" and framewise["frames"] == 4


@pytest.mark.parametrize("overrides, match", [
    (["sweep.models=[vivit_nano]"], r"sweep.models=\['vivit_nano'\]: video model"),
    (["sweep.video.models=[deit_tiny]"], r"sweep.video.models=\['deit_tiny'\]: image model"),
    # sizes and references: before the first point, not a traceback at the point (and no CSV)
    (["sweep.resolutions=[64,-8]"], r"sweep.resolutions=\[64, -8\]: must be integers >= 8 \(pixels\), got -8"),
    (["sweep.tokens=[0]"], r"sweep.tokens=\[0\]: must be positive integers, got 0"),
    (["sweep.video.models=[videosparseformer_nano]", "sweep.video.frames=[0]"], r"sweep.video.frames=\[0\]"),
    (["sweep.video.models=[videosparseformer_nano]", "sweep.video.reference=vivit_nanoo"],
     r"sweep.video.reference='vivit_nanoo': unknown model"),
    (["sweep.reference=deit_smal"], r"sweep.reference='deit_smal': unknown model"),
    (["mode=memory", "memory.model=vivit_nano"], r"memory.model='vivit_nano': mode=memory measures an image "
                                                 r"SparseFormer"),
    (["mode=memory", "memory.resolution=-64"], r"memory.resolution=-64: must be an integer >= 8 \(pixels\)"),
])
def test_a_model_in_the_wrong_sweep_is_refused_before_any_timing(tmp_path, overrides, match):
    with pytest.raises(benchmark.SweepConfigError, match=match):
        benchmark.run(config("logger.mode=disabled", *overrides), tmp_path, progress=False)
    assert not list(tmp_path.glob("*.csv"))


@pytest.mark.parametrize("overrides, match", [
    (["sweep.warmup=-3"], r"sweep.warmup=-3: must be an integer >= 0, got -3"),
    (["sweep.latency_repeats=-1"], r"sweep.latency_repeats=-1: must be an integer >= 0, got -1"),
    (["mode=kernels", "kernels.repeats=0"], r"kernels.repeats=0: must be a positive integer, got 0"),
    (["mode=kernels", "kernels.batch_sizes=[16]"], r"kernels.batch_sizes=\[16\]: the CPU runs batches <= 8"),
    (["mode=memory", "precision=fp8"], r"precision must be one of"),
])
def test_settings_that_cannot_give_a_measurement_stop_at_start(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        benchmark.run(config("logger.mode=disabled", *overrides), tmp_path, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_a_cuda_device_without_cuda_is_a_clear_error(device):
    with pytest.raises(ValueError, match=f"device={device} but no CUDA device is visible"):
        benchmark.resolve_device(device)


def test_a_malformed_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        benchmark.resolve_device("cuda:x")
