"""mp4, latent and sidecar writers: read back with PyAV / safetensors; atomic; clear errors before any work."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open

from wanpack.errors import UsageError, WanpackError
from wanpack.manifests.run_config import resolve_run_config
from wanpack.runtime import video
from wanpack.runtime.run_record import RunRecord, StageTimer, file_sha256, sidecar_path, write_sidecar
from wanpack.runtime.video import check_output_path, read_video_info, save_latents, write_video


def decode_rgb(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def color_bars(frames: int, height: int, width: int) -> np.ndarray:
    """[F,H,W,3] uint8: red left half, blue right half, a brightness ramp over time."""
    x = np.zeros((frames, height, width, 3), np.uint8)
    for i in range(frames):
        level = 80 + 10 * i
        x[i, :, : width // 2, 0] = level
        x[i, :, width // 2 :, 2] = level
    return x


def test_uint8_frames_round_trip(tmp_path):
    out = tmp_path / "clip.mp4"
    frames = color_bars(9, 64, 96)
    assert write_video(out, frames) == out
    assert read_video_info(out) == (9, 64, 96, 16.0)
    back = np.stack(decode_rgb(out)).astype(np.int16)
    assert back.shape == (9, 64, 96, 3)
    # H.264 yuv420p at crf 18: flat colour areas come back within a few levels (edges bleed; skip them).
    inner = (slice(None), slice(8, 56), np.r_[4:40, 56:92])
    assert np.abs(back[inner] - frames.astype(np.int16)[inner]).mean() < 3.0


def test_vae_float_layout_and_fps(tmp_path):
    """[1,3,F,H,W] float in [-1,1] (the VAE's output) lands with the right orientation and colour order."""
    frames = torch.from_numpy(color_bars(5, 48, 80)).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3,F,H,W]
    frames[:, 0, :4, :4] = 5.0  # out of range: clamped, not wrapped
    out = tmp_path / "vae.mp4"
    write_video(out, frames[None], fps=24)
    count, height, width, fps = read_video_info(out)
    assert (count, height, width, fps) == (5, 48, 80, 24.0)
    first = decode_rgb(out)[1].astype(int)
    assert first[24, 10, 0] > 60 and first[24, 10, 2] < 30  # left half red
    assert first[24, 70, 2] > 60 and first[24, 70, 0] < 30  # right half blue


def test_write_is_atomic_and_never_corrupts_an_existing_file(tmp_path, monkeypatch):
    out = tmp_path / "keep.mp4"
    write_video(out, color_bars(5, 32, 32))
    before = out.read_bytes()

    def broken_frames():
        raise RuntimeError("decoder died")

    monkeypatch.setattr(video, "_frame_iter", lambda frames: (5, 32, 32, (broken_frames() for _ in range(5))))
    with pytest.raises(RuntimeError, match="decoder died"):
        write_video(out, color_bars(5, 32, 32))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mp4"]  # no temp files left behind


def test_output_permissions_follow_umask(tmp_path):
    out = write_video(tmp_path / "p.mp4", color_bars(1, 16, 16))
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask


def test_unwritable_paths_fail_before_work(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "v.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is not a folder"):
        check_output_path(tmp_path / "file" / "v.mp4")
    with pytest.raises(UsageError, match="is a directory"):
        check_output_path(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked if not os.access(locked, os.W_OK) else Path("/proc")  # root writes anywhere but /proc
        with pytest.raises(UsageError, match="cannot write to"):
            check_output_path(target / "v.mp4")
    finally:
        locked.chmod(0o700)


def test_bad_frames_are_rejected(tmp_path):
    with pytest.raises(UsageError, match="even sizes"):
        write_video(tmp_path / "odd.mp4", np.zeros((3, 31, 32, 3), np.uint8))
    with pytest.raises(UsageError, match=r"\[3, F, H, W\]"):
        write_video(tmp_path / "bad.mp4", torch.zeros(4, 3, 16, 16))
    assert not any(tmp_path.iterdir())


def test_missing_pyav_is_a_clear_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(WanpackError, match="PyAV is not installed.* - pip install av"):
        write_video(tmp_path / "v.mp4", color_bars(1, 16, 16))


def test_save_latents_round_trip(tmp_path):
    lat = torch.randn(16, 3, 6, 8)
    out = save_latents(tmp_path / "v.latents.safetensors", lat, {"seed": 5, "sampler": "unipc"})
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("latents"), lat)
        assert f.metadata() == {"seed": "5", "sampler": "unipc"}


def test_sidecar_records_the_run(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"format": "wanpack"}')
    cfg = resolve_run_config("distill-4step", {"seed": 11})
    timer = StageTimer()
    with timer.stage("denoise"):
        busy_until = time.thread_time() + 0.05
        while time.thread_time() < busy_until:  # CPU work on this thread
            torch.ones(4).sum()
    with timer.stage("vae_decode"):
        time.sleep(0.05)  # wall time, no CPU
    record = RunRecord(command=["wanpack", "run", "--prompt", "a cat"], seed=11, config=cfg.to_dict(),
                       pack=str(tmp_path), manifest_sha256=file_sha256(manifest), video="v.mp4")  # fmt: skip
    path = write_sidecar(sidecar_path(tmp_path / "v.mp4"), record.finish(timer))
    assert path.name == "v.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["seed"] == 11 and data["command"][-1] == "a cat"
    assert data["manifest_sha256"] == hashlib.sha256(b'{"format": "wanpack"}').hexdigest()
    assert set(data["timings_s"]) == {"denoise", "vae_decode", "total"}
    cpu = data["stage_cpu_s"]
    assert set(cpu) == {"denoise", "vae_decode"}
    assert cpu["denoise"]["thread"] >= 0.04 and cpu["denoise"]["process"] >= cpu["denoise"]["thread"] - 0.01
    assert cpu["vae_decode"]["thread"] < 0.03 < data["timings_s"]["vae_decode"]
    assert data["peak_rss_bytes"] > 10 * 2**20
    assert data["config"]["sampler"] == "distill" and data["config"]["denoising_step_list"] == [1000, 750, 500, 250]
    assert data["environment"]["torch"] == torch.__version__
