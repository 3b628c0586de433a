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
    assert side["seed"] == 5 and side["config"]["steps"] == 3 and side["synthetic_weights"] is False
    assert {"text", "denoise", "decode", "write"} <= set(side["timings_s"])
    assert side["manifest_sha256"] == hashlib.sha256((packs["t2v"] / "manifest.json").read_bytes()).hexdigest()
    assert side["backends"]["attention"] == "sdpa" and side["backends"]["attention_ran"] == "sdpa"  # CPU runs fp32


def test_same_seed_same_video_latents(packs, tmp_path):
    args = ["run", "--pack", packs["t2v"], "--prompt", "a fox", "--frames", 5, "--height", 32, "--width", 32,
            "--steps", 2, "--seed", 1, "--guidance", 1, "--save-latents"]  # fmt: skip
    assert run(*args, "--out", tmp_path / "a.mp4").exit_code == 0
    assert run(*args, "--out", tmp_path / "b.mp4").exit_code == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a.latents.safetensors"), load_file(tmp_path / "b.latents.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_i2v_uses_image_aspect(packs, tmp_path):
    video = tmp_path / "i2v.mp4"
    result = run("run", "--pack", packs["i2v"], "--image", packs["image"], "--prompt", "a cat", "--frames", 5,
                 "--height", 96, "--width", 128, "--steps", 2, "--out", video)  # fmt: skip
    assert result.exit_code == 0, result.output
    frames, height, width, _ = read_video_info(video)
    assert frames == 5 and (height, width) == (96, 128)  # 3:4 image, area 96*128 -> the same 96 x 128


def test_demo_runs_with_no_pack(tmp_path, monkeypatch):
    monkeypatch.setenv("WANPACK_CACHE", str(tmp_path / "cache"))
    video = tmp_path / "demo.mp4"
    result = run("run", "--out", video, "--frames", 5, "--steps", 2, "--height", 64, "--width", 64)
    assert result.exit_code == 0, result.output
    assert "RANDOM" in result.output
    assert read_video_info(video)[0] == 5
    assert json.loads(video.with_suffix(".json").read_text())["synthetic_weights"] is True


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
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)  # fmt: skip
def test_bad_input_is_refused_before_heavy_work(packs, tmp_path, case, args, fragments):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "huge.png").write_bytes(_png_header(11000, 11000))
    (tmp_path / "bomb.png").write_bytes(_png_header(30000, 30000))
    (tmp_path / "cfg.json").write_text(json.dumps({"infer_stepz": 4}))
    subst = {"i2v": packs["i2v"], "t2v": packs["t2v"], "image": packs["image"], "bad": tmp_path / "bad.png",
             "cfg": tmp_path / "cfg.json", "huge": tmp_path / "huge.png", "bomb": tmp_path / "bomb.png"}  # fmt: skip
    argv = ["run", *[subst.get(a, a) if isinstance(a, str) else a for a in args]]
    if "--out" not in args:
        argv += ["--out", tmp_path / "v.mp4"]
    started = time.perf_counter()
    _fails_fast(run(*argv), *fragments, started=started)
    assert not (tmp_path / "v.mp4").exists()
