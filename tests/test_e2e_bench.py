"""The end-to-end benchmark's table code on a real sidecar (a CPU demo run), so the GPU run does not die on a typo
and its finer columns (step 1, T5 forward, CPU per stage) read the fields the session writes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from typer.testing import CliRunner

from wanpack.cli import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import e2e_bench  # noqa: E402


def test_summary_and_table_read_a_real_sidecar(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANPACK_CACHE", str(tmp_path / "cache"))
    video = tmp_path / "demo.mp4"
    res = CliRunner().invoke(app, ["run", "--out", str(video), "--frames", "5", "--steps", "2", "--height", "32",
                                   "--width", "32"])  # fmt: skip
    assert res.exit_code == 0, res.output
    record = json.loads(video.with_suffix(".json").read_text())
    run = {"records": record, "wall_s": 9.0, "cpu_fraction": 0.5, "vram_peak_process_gib": None,
           "vram_peak_device_gib": 0.0}  # fmt: skip
    summary = e2e_bench.summarize(run)
    assert summary["step1_s"] == record["details"]["steps_s"][0] and len(summary["later_steps_s"]) == 1
    assert summary["t5_forward_s"] == record["details"]["t5_forward_s"] > 0
    assert set(summary["main_cpu_s"]) == set(record["timings_s"]) - {"total"}
    floors = {"480p": {"t5_forward_s": 0.1, "dit_forward_s": 0.5, "dit_steps_s": 1.0, "vae_decode_s": 1.0, "device": "cpu"}}
    e2e_bench.print_table({"floors": floors, "summary": {"warm": summary}, "startup_floor_s": 1.0})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("warm") and "in-process" in lines[-2]
    assert "step 1" in lines[-1] and "T5 forward" in lines[-1] and "denoise" in lines[-1]


def test_pack_only_cold_evicts_the_pack_files_and_leaves_the_rest_of_the_cache(tmp_path, monkeypatch):
    """`--runs cold_pack`: every shard of the pack is advised out of the page cache, and drop_caches (which would
    also evict torch's libraries) is never written; the plain cold run still writes it."""
    from wanpack.runtime.stream import bench

    for name in ("dit/block_0.safetensors", "dit/block_1.safetensors", "t5/block_0.safetensors"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * 4096)
    advised, opened = [], []
    real_fadvise = bench.os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        return real_fadvise(fd, offset, length, advice)

    def fake_open(path, *args, **kwargs):
        opened.append(str(path))
        raise PermissionError("not root in this test")

    monkeypatch.setattr(bench.os, "posix_fadvise", fadvise)
    monkeypatch.setattr(bench, "open", fake_open, raising=False)
    assert e2e_bench.drop_caches(tmp_path, everything=False) is False
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p, _ in advised) == [
        "dit/block_0.safetensors", "dit/block_1.safetensors", "t5/block_0.safetensors"]
    assert {a for _, a in advised} == {os.POSIX_FADV_DONTNEED} and opened == []
    assert e2e_bench.drop_caches(tmp_path) is False and opened == ["/proc/sys/vm/drop_caches"]
