"""`wanpack run` end to end on tiny packs (CPU): a decodable mp4 of the right size, and bad input refused up front."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wanpack.cli import app
from wanpack.convert.converter import ConvertOptions, convert_checkpoint
from wanpack.convert.synth import synth_checkpoint
from wanpack.runtime.video import read_video_info

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run")
    out = {}
    for arch, quant in (("wan2.1-t2v-1.3b", "int8"), ("wan2.1-i2v-14b", "fp8")):
        synth_checkpoint(root / arch, arch, layers=2, dim_scale="tiny", components=("dit", "t5", "clip", "vae"))
        convert_checkpoint(root / arch, root / f"{arch}-pack", ConvertOptions(quant=quant, components=("all",)))
        out[arch.split("-")[1]] = root / f"{arch}-pack"
    img = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    from PIL import Image

    Image.fromarray(img).save(root / "in.png")
    out["image"] = root / "in.png"
    return out


def test_t2v_writes_decodable_mp4_and_sidecar(packs, tmp_path):
    video = tmp_path / "t2v.mp4"
    result = run("run", "--pack", packs["t2v"], "--prompt", "a fox", "--frames", 9, "--height", 64, "--width", 96,
                 "--steps", 3, "--seed", 5, "--out", video)  # fmt: skip
    assert result.exit_code == 0, result.output
    frames, height, width, fps = read_video_info(video)
    assert (frames, height, width, fps) == (9, 64, 96, 16.0)
    side = json.loads(video.with_suffix(".json").read_text())
    assert side["seed"] == 5 and side["config"]["steps"] == 3
    assert side["synthetic_weights"] is True  # converted from a `wanpack synth` checkpoint: random weights
    assert {"text", "denoise", "decode", "write"} <= set(side["timings_s"])
    assert side["manifest_sha256"] == hashlib.sha256((packs["t2v"] / "manifest.json").read_bytes()).hexdigest()
    backends = side["backends"]
    if not torch.cuda.is_available():
        assert backends["attention"] == backends["attention_ran"] == "sdpa"  # CPU runs fp32
    else:  # the card's check picks (e.g. sage); this tiny pack's head dim goes to the best exact kernel if sage's not
        from wanpack.runtime.ops.attention import exact_backend

        served = {backends["attention"], exact_backend(torch.device("cuda")).name}
        assert set(backends["attention_ran"].split(",")) <= served, backends


def test_vae_dtype_flag_is_honored_and_recorded(packs, tmp_path):
    """bf16 decode on request (the default on a CPU is fp32), recorded in the sidecar; a bad value is refused."""
    outs = {}
    for dtype in ("bf16", None):
        video = tmp_path / f"{dtype}.mp4"
        extra = ["--vae-dtype", dtype] if dtype else []
        result = run("run", "--pack", packs["t2v"], "--prompt", "a fox", "--frames", 5, "--height", 32, "--width", 32,
                     "--steps", 1, "--seed", 3, "--out", video, *extra)  # fmt: skip
        assert result.exit_code == 0, result.output
        side = json.loads(video.with_suffix(".json").read_text())
        assert side["encoder"]["vae_dtype"] == (dtype or "fp32") and side["encoder"]["vae_tiles"] is None
        assert side["config"]["vae_dtype"] == dtype
        outs[dtype] = read_video_info(video)
    assert outs["bf16"] == outs[None]
    bad = run("run", "--pack", packs["t2v"], "--prompt", "a fox", "--vae-dtype", "fp16", "--out", tmp_path / "x.mp4")
    assert bad.exit_code == 2 and "--vae-dtype" in bad.output and not (tmp_path / "x.mp4").exists()


def test_same_seed_same_video_latents(packs, tmp_path):
    args = ["run", "--pack", packs["t2v"], "--prompt", "a fox", "--frames", 5, "--height", 32, "--width", 32,
            "--steps", 2, "--seed", 1, "--guidance", 1, "--save-latents"]  # fmt: skip
    assert run(*args, "--out", tmp_path / "a.mp4").exit_code == 0
    assert run(*args, "--out", tmp_path / "b.mp4").exit_code == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a.latents.safetensors"), load_file(tmp_path / "b.latents.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_i2v_uses_image_aspect_and_records_the_size_made(packs, tmp_path):
    from PIL import Image

    Image.fromarray((np.random.default_rng(1).random((48, 80, 3)) * 255).astype(np.uint8)).save(tmp_path / "wide.png")
    video = tmp_path / "i2v.mp4"
    result = run("run", "--pack", packs["i2v"], "--image", tmp_path / "wide.png", "--prompt", "a cat", "--frames", 5,
                 "--height", 48, "--width", 64, "--steps", 1, "--out", video)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_video_info(video)[:3] == (5, 32, 64)  # 3:5 image at the area of 48 x 64 (the reference's rule)
    side = json.loads(video.with_suffix(".json").read_text())
    assert side["size"] == {"height": 32, "width": 64, "frames": 5}  # what was made...
    assert (side["config"]["height"], side["config"]["width"]) == (48, 64)  # ...and what was asked
    assert "64x32 (asked 64x48" in result.output


def test_demo_runs_with_no_pack(tmp_path, monkeypatch):
    monkeypatch.setenv("WANPACK_CACHE", str(tmp_path / "cache"))
    video = tmp_path / "demo.mp4"
    result = run("run", "--out", video, "--frames", 5, "--steps", 2, "--height", 64, "--width", 64)
    assert result.exit_code == 0, result.output
    assert "RANDOM" in result.output
    assert read_video_info(video)[0] == 5
    assert json.loads(video.with_suffix(".json").read_text())["synthetic_weights"] is True


TINY_RUN = ["--frames", 5, "--height", 32, "--width", 32, "--steps", 1]  # fast to run, should it get that far


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels but carries almost no data (what a decoder would allocate for)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _fails_fast(result, *fragments: str, started: float) -> None:
    assert result.exit_code != 0
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "Traceback" not in result.output, result.output
    for f in fragments:
        assert f in " ".join(lines), (f, result.output)
    assert time.perf_counter() - started < 5.0  # refused before any heavy work
    assert "denoise" not in result.output and "vram_budget_gib" not in result.output, result.output


@pytest.mark.parametrize(
    ("case", "args", "fragments"),
    [
        ("i2v without image", ["--pack", "i2v", "--prompt", "x"], ["--image"]),
        ("frames not 4n+1", ["--pack", "t2v", "--prompt", "x", "--frames", 10], ["4n+1"]),
        ("size not /16", ["--pack", "t2v", "--prompt", "x", "--height", 100], ["16"]),
        ("wrong model type", ["--pack", "t2v", "--prompt", "x", "--preset", "i2v-14b-480p"], ["i2v"]),
        ("image for t2v", ["--pack", "t2v", "--prompt", "x", "--image", "image"], ["no --image"]),
        ("unreadable image", ["--pack", "i2v", "--prompt", "x", "--image", "bad"], ["not a readable image"]),
        ("121 Mpx image of 60 bytes", ["--pack", "i2v", "--prompt", "x", "--image", "huge"], ["121 Mpx", "downscale"]),
        ("decompression bomb", ["--pack", "i2v", "--prompt", "x", "--image", "bomb"], ["decompression bomb"]),
        ("output folder missing", ["--pack", "t2v", "--prompt", "x", "--out", "/nonexistent/dir/v.mp4"], ["does not exist"]),
        ("not a pack", ["--pack", "/tmp", "--prompt", "x"], ["no manifest"]),
        ("unknown config key", ["--pack", "t2v", "--prompt", "x", "--config", "cfg"], ["infer_stepz", "infer_steps"]),
        ("size past the model", ["--pack", "t2v", "--prompt", "x", "--height", 100000, "--width", 100000], ["1024"]),
        ("video past the RAM", ["--pack", "t2v", "--prompt", "x", "--ram-budget", "1MiB"], ["RAM", "--ram-budget"]),
        ("unknown device", ["--pack", "t2v", "--prompt", "x", "--device", "tpu"], ["--device 'tpu'"]),
        ("missing tiny VAE", ["--pack", "t2v", "--prompt", "x", "--tiny-vae", "nowhere", *TINY_RUN], ["does not exist"]),
        ("corrupt tiny VAE", ["--pack", "t2v", "--prompt", "x", "--tiny-vae", "bad", *TINY_RUN], ["cannot read tiny VAE"]),
        ("budget unreadable", ["--pack", "t2v", "--prompt", "x", "--vram-budget", "lots"], ["--vram-budget 'lots'"]),
        ("flag named, not key", ["--pack", "t2v", "--prompt", "x", "--granularity", "bogus"], ["--granularity 'bogus'"]),
        ("flag named, not field", ["--pack", "t2v", "--prompt", "x", "--disk-workers", 0], ["--disk-workers must"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)  # fmt: skip
def test_bad_input_is_refused_before_heavy_work(packs, tmp_path, case, args, fragments):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "huge.png").write_bytes(_png_header(11000, 11000))
    (tmp_path / "bomb.png").write_bytes(_png_header(30000, 30000))
    (tmp_path / "cfg.json").write_text(json.dumps({"infer_stepz": 4}))
    subst = {"i2v": packs["i2v"], "t2v": packs["t2v"], "image": packs["image"], "bad": tmp_path / "bad.png",
             "cfg": tmp_path / "cfg.json", "huge": tmp_path / "huge.png", "bomb": tmp_path / "bomb.png",
             "nowhere": tmp_path / "missing.pth"}  # fmt: skip
    argv = ["run", *[subst.get(a, a) if isinstance(a, str) else a for a in args]]
    if "--out" not in args:
        argv += ["--out", tmp_path / "v.mp4"]
    started = time.perf_counter()
    _fails_fast(run(*argv), *fragments, started=started)
    assert not (tmp_path / "v.mp4").exists()


def _refused(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and all(f in result.output for f in fragments), result.output


def test_outputs_never_lose_data(packs, tmp_path):
    small = ["--pack", packs["t2v"], "--prompt", "x", "--frames", 5, "--height", 32, "--width", 32, "--steps", 1]
    _refused(run("run", *small, "--out", tmp_path / "a.json"), "ending in .mp4")  # was: only the sidecar, "success"
    assert not (tmp_path / "a.json").exists()
    image = tmp_path / "in.png"
    image.write_bytes(packs["image"].read_bytes())
    _refused(run("run", "--pack", packs["i2v"], "--prompt", "x", "--image", image, "--out", image), "--image input")
    assert image.read_bytes() == packs["image"].read_bytes()
    (tmp_path / "v.json").write_text(json.dumps({"steps": 1}))
    _refused(run("run", *small, "--config", tmp_path / "v.json", "--out", tmp_path / "v.mp4"), "--config input")
    assert json.loads((tmp_path / "v.json").read_text()) == {"steps": 1}
    (tmp_path / "old.mp4").write_bytes(b"an earlier video")
    _refused(run("run", *small, "--out", tmp_path / "old.mp4"), "already exists", "--overwrite")
    assert (tmp_path / "old.mp4").read_bytes() == b"an earlier video"
    result = run("run", *small, "--out", tmp_path / "old.mp4", "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_video_info(tmp_path / "old.mp4")[:3] == (5, 32, 32)
    _refused(run("run", *small, "--out", tmp_path / "old.mp4"), "old.mp4 already exists")


def test_dtype_is_checked_before_compute(packs, tmp_path, monkeypatch):
    monkeypatch.setenv("DTYPE", "bogus")  # read only on a GPU, but refused on every run
    started = time.perf_counter()
    result = run("run", "--pack", packs["t2v"], "--prompt", "x", "--out", tmp_path / "v.mp4")
    assert result.exit_code == 2
    _fails_fast(result, "DTYPE", started=started)


def test_budgets_are_size_strings_and_bare_numbers_are_gib(packs, tmp_path):
    video = tmp_path / "v.mp4"
    result = run("run", "--pack", packs["t2v"], "--prompt", "x", "--frames", 5, "--height", 32, "--width", 32,
                 "--steps", 1, "--vram-budget", "8GiB", "--ram-budget", "6", "--out", video)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads(video.with_suffix(".json").read_text())["config"]
    assert (config["vram_budget_gib"], config["ram_budget_gib"]) == (8.0, 6.0)


def test_random_weight_pack_says_so(tmp_path):
    assert run("synth", "--dim-scale", "tiny", "--layers", "1", "-c", "all", "--as-pack", "--out", tmp_path / "p").exit_code == 0
    video = tmp_path / "v.mp4"
    result = run("run", "--pack", tmp_path / "p", "--prompt", "x", "--frames", 5, "--height", 32, "--width", 32,
                 "--steps", 1, "--out", video)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "holds RANDOM weights" in result.output and "RANDOM weights)" in result.output
    side = json.loads(video.with_suffix(".json").read_text())
    assert side["synthetic_weights"] is True and side["pack"] == str(tmp_path / "p")


@pytest.mark.gpu
def test_planner_verdict_comes_before_any_compute(packs, tmp_path):
    started = time.perf_counter()
    result = run("run", "--pack", packs["t2v"], "--prompt", "x", "--vram-budget", "1MiB", "--out", tmp_path / "v.mp4")
    assert result.exit_code == 2
    # (the wording seen on an H200, 2026-12-01: a budget below the CUDA context's own share is refused as such)
    _fails_fast(result, "--vram-budget", "does not even hold the CUDA context", started=started)
    assert "text (" not in result.output and "plan:" not in result.output  # refused before the session planned


def test_prompts_jobs_refuse_existing_outputs_unless_overwrite(packs, tmp_path):
    """`run --prompts` checks every line's outputs before the first job (naming the line), like `run --out`; with
    --overwrite both videos are made. The random-weight warning comes once for the whole file."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a", "out": "a.mp4"}\n{"prompt": "b", "out": "b.mp4"}\n')
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "b.mp4").write_bytes(b"an earlier video")
    small = ["--frames", 5, "--height", 32, "--width", 32, "--steps", 1]
    result = run("run", "--pack", packs["t2v"], "--prompts", jobs, "--out-dir", videos, *small)
    _refused(result, "jobs.jsonl line 2", "b.mp4 already exists", "--overwrite")
    assert sorted(p.name for p in videos.iterdir()) == ["b.mp4"] and (videos / "b.mp4").read_bytes() == b"an earlier video"
    result = run("run", "--pack", packs["t2v"], "--prompts", jobs, "--out-dir", videos, *small, "--overwrite")
    assert result.exit_code == 0, result.output
    assert [read_video_info(videos / n)[:3] for n in ("a.mp4", "b.mp4")] == [(5, 32, 32)] * 2
    assert result.output.count("holds RANDOM weights") == 1 and result.output.count("RANDOM weights)") == 2


def test_serve_budgets_are_size_strings_checked_before_the_server_starts(packs, monkeypatch):
    pytest.importorskip("fastapi")  # (the serve extra; without it serve refuses before reading its budgets)
    pytest.importorskip("uvicorn")
    from wanpack.runtime import serve

    seen = {}

    class Stop(Exception):
        pass

    def fake_server(pack, out_dir, **kwargs):
        seen.update(kwargs["overrides"])
        raise Stop

    monkeypatch.setattr(serve, "JobServer", fake_server)
    result = run("serve", "--pack", packs["t2v"], "--vram-budget", "lots")
    _refused(result, "--vram-budget 'lots'")
    assert seen == {}  # refused before the session was opened
    result = run("serve", "--pack", packs["t2v"], "--vram-budget", "8", "--ram-budget", "512MiB")
    assert isinstance(result.exception, Stop) and seen == {"vram_budget_gib": 8.0, "ram_budget_gib": 0.5}


def test_budget_verdict_comes_before_the_session_opens(packs, tmp_path, monkeypatch):
    """The planner's verdict (faked here: a CPU plan never runs out of VRAM) is asked before a Session exists."""
    from wanpack.runtime import pipeline
    from wanpack.runtime.stream.planner import BudgetError

    def verdict(*args, **kwargs):
        raise BudgetError("block streaming needs at least 3.10 GiB of VRAM - raise --vram-budget")

    def no_session(*args, **kwargs):
        raise AssertionError("a session was opened before the budget verdict")

    monkeypatch.setattr(pipeline, "plan_run", verdict)
    monkeypatch.setattr(pipeline, "Session", no_session)
    started = time.perf_counter()
    result = run("run", "--pack", packs["t2v"], "--prompt", "x", *TINY_RUN, "--out", tmp_path / "v.mp4")
    assert result.exit_code == 2
    _fails_fast(result, "needs at least", started=started)


def test_device_is_checked_once_and_strictly(monkeypatch):
    from wanpack.errors import UsageError
    from wanpack.runtime.session import select_device

    for bad, fragment in (("tpu", "--device 'tpu'"), ("cuda:x", "not a device")):
        with pytest.raises(UsageError, match=fragment):
            select_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UsageError, match="has 1 CUDA devices"):
        select_device("cuda:1")


def test_video_size_limits_touch_no_gpu_and_count_what_is_held(monkeypatch):
    """The RAM verdict reads MemAvailable only (it runs before CUDA's settings are applied); the whole decoded clip is
    float32 on the CPU path and uint8 frames on a GPU."""
    from wanpack.errors import UsageError
    from wanpack.runtime import run_limits
    from wanpack.runtime.stream import planner

    def no_cuda(*args, **kwargs):
        raise AssertionError("the size check started CUDA")

    monkeypatch.setattr(planner, "detect_budgets", no_cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda)
    run_limits.check_video_size(81, 480, 832)  # the default RAM budget: what this machine has available
    budget = 0.2  # GiB: the 480p clip is 370 MiB as float32, 93 MiB as uint8
    with pytest.raises(UsageError, match="needs 370 MiB of RAM"):
        run_limits.check_video_size(81, 480, 832, ram_budget_gib=budget)
    run_limits.check_video_size(81, 480, 832, ram_budget_gib=budget, on_gpu=True)
    with pytest.raises(UsageError, match="1024"):
        run_limits.check_video_size(81, 16400, 832, on_gpu=True)


def test_the_console_command_ends_with_everything_written(packs, tmp_path):
    """`python -m wanpack run` ends the process right after the command (no interpreter teardown): the JSON on stdout,
    the video and its sidecar must all be complete by then; a failing run still exits non-zero with its error line."""
    import subprocess
    import sys

    out = tmp_path / "v.mp4"
    cmd = [sys.executable, "-m", "wanpack", "run", "--pack", str(packs["t2v"]), "--prompt", "a fox", "--out", str(out),
           "--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--device", "cpu", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["video"] == str(out) and read_video_info(out)[:3] == (5, 32, 32)
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == record["seed"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # the output exists, no --overwrite
    assert again.returncode != 0 and "error:" in again.stderr and again.stdout == ""


def test_graph_mode_knob_is_checked_and_run_says_it_runs_eagerly(packs, tmp_path, monkeypatch):
    """ENABLE_GRAPH_MODE is the seed guide's knob; only `wanpack bench` captures graphs so far, so `run` says it runs
    eagerly instead of ignoring the setting, and a value that is not true/false is refused like a bad flag."""
    video = tmp_path / "v.mp4"
    monkeypatch.setenv("ENABLE_GRAPH_MODE", "true")
    result = run("run", "--pack", packs["t2v"], "--prompt", "a fox", *TINY_RUN, "--out", video)
    assert result.exit_code == 0, result.output
    assert "ENABLE_GRAPH_MODE: CUDA graphs are used by `wanpack bench` only so far" in result.output
    assert video.exists()
    monkeypatch.setenv("ENABLE_GRAPH_MODE", "sometimes")
    _refused(run("run", "--pack", packs["t2v"], "--prompt", "a fox", *TINY_RUN, "--out", tmp_path / "w.mp4"),
             "ENABLE_GRAPH_MODE='sometimes'")  # fmt: skip
    assert not (tmp_path / "w.mp4").exists()
    monkeypatch.setenv("ENABLE_GRAPH_MODE", "false")
    result = run("run", "--pack", packs["t2v"], "--prompt", "a fox", *TINY_RUN, "--out", tmp_path / "x.mp4")
    assert result.exit_code == 0 and "ENABLE_GRAPH_MODE" not in result.output, result.output
