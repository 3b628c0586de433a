"""The readahead a run queues before torch is imported: what it asks for, in which order, and what it never touches."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from wanpack.runtime.stream import early_read


def _manifest(pack: Path) -> dict:
    return json.loads((pack / "manifest.json").read_text())


def _blocks(paths: list[str], folder: str) -> list[int]:
    return [int(p.rsplit("_", 1)[1].split(".")[0]) for p in paths if p.startswith(folder + "/block_")]


def test_order_encoder_blocks_then_dit_when_ram_holds_the_pack(demo_pack_dir):
    manifest = _manifest(demo_pack_dir)
    order = early_read.early_read_order(manifest, ("t5",), ram_bytes=1 << 40, read_mode=None)
    t5 = [p for p in order if p.startswith("t5/")]
    assert t5 and _blocks(t5, "t5") == sorted(_blocks(t5, "t5"))
    assert "t5/non_block.safetensors" not in order  # the token table is read row by row, never whole
    first_dit = next(i for i, p in enumerate(order) if p.startswith("dit/"))
    assert all(p.startswith("t5/") for p in order[:first_dit])  # the text encoder's blocks come first
    assert order[first_dit] == "dit/non_block.safetensors"
    dit = _blocks(order, "dit")
    assert dit == list(range(len(dit))) and len(dit) == len(manifest["components"]["dit"]["shards"]) - 1


def test_nothing_is_read_ahead_for_a_run_that_reads_direct(demo_pack_dir):
    """O_DIRECT runs read every component O_DIRECT: pages read ahead would only be read a second time."""
    manifest = _manifest(demo_pack_dir)
    total = sum(s["size"] for c in manifest["components"].values() for s in c["shards"])
    assert early_read.early_read_order(manifest, ("t5",), ram_bytes=total, read_mode=None) == []
    assert early_read.early_read_order(manifest, ("t5",), ram_bytes=1 << 40, read_mode="direct") == []
    assert early_read.early_read_order(manifest, ("t5",), ram_bytes=None, read_mode=None) == []
    asked = early_read.early_read_order(manifest, ("t5",), ram_bytes=None, read_mode="cached")
    assert asked[0].startswith("t5/block_") and any(p.startswith("dit/") for p in asked)


def test_resident_fraction_sees_a_file_just_read(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, 1 << 20)
        assert early_read.resident_fraction(fd) > 0.9
    finally:
        os.close(fd)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    fd = os.open(empty, os.O_RDONLY)
    try:
        assert early_read.resident_fraction(fd) == 1.0
    finally:
        os.close(fd)


def test_resident_files_are_not_advised(demo_pack_dir, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(early_read, "resident_fraction", lambda fd: 1.0)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append(fd))
    early_read.start_early_read(demo_pack_dir, ram_budget_gib=1024.0).join(10)
    assert calls == []


def test_advice_follows_the_order_and_stops_at_a_file_outside_the_pack(demo_pack_dir, tmp_path, monkeypatch):
    pack = tmp_path / "pack"
    shutil.copytree(demo_pack_dir, pack)
    advised: list[str] = []
    real_open = early_read.open_pack_file

    def recording_open(root, rel, *args, **kwargs):
        fd, path = real_open(root, rel, *args, **kwargs)
        advised.append(rel)
        return fd, path

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(early_read, "open_pack_file", recording_open)
    monkeypatch.setattr(early_read, "resident_fraction", lambda fd: 0.0)  # as after a reboot
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n)))
    thread = early_read.start_early_read(pack, ram_budget_gib=1024.0)
    assert thread is not None
    thread.join(10)
    expected = early_read.early_read_order(_manifest(pack), ("t5",), 1 << 40, None)
    assert advised == expected and calls == [(0, 0)] * len(expected)

    # a shard swapped for a link out of the pack: refused, and nothing after it is advised either
    advised.clear()
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x" * 4096)
    victim = pack / expected[1]
    victim.unlink()
    victim.symlink_to(outside)
    thread = early_read.start_early_read(pack, ram_budget_gib=1024.0)
    thread.join(10)
    assert advised == expected[:1]


@pytest.mark.parametrize("case", ["off", "no pack", "no manifest", "bad manifest"])
def test_nothing_started(case, demo_pack_dir, tmp_path, monkeypatch):
    pack: Path | None = tmp_path / "pack"
    pack.mkdir()
    if case == "off":
        shutil.copy(demo_pack_dir / "manifest.json", pack / "manifest.json")
        monkeypatch.setenv("WANPACK_EARLY_READ", "0")
    elif case == "no pack":
        pack = None
    elif case == "bad manifest":
        (pack / "manifest.json").write_text("[1, 2")
    assert early_read.start_early_read(pack) is None


def test_run_command_imports_no_torch_before_its_readahead():
    """The readahead is only worth its thread if it starts before the seconds of `import torch`."""
    import subprocess
    import sys

    code = ("import sys; from wanpack.commands import run; from wanpack.runtime.stream import early_read; "
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
