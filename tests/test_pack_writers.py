"""Writers and readers of one pack folder at once, and crashes in between (convert/atomic.py, manifests/pack_lock.py).

A `--force` replacement is one atomic exchange (or a rename-aside that is undone on failure); a crash between the two
renames of the fallback leaves the old pack where the next conversion puts it back; two conversions to one --out are
serialized by a lock, not by guessing from PIDs; and a conversion never swaps a pack that a run has pinned.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wanpack.cli import app
from wanpack.convert import atomic
from wanpack.convert.converter import ConvertOptions, convert_checkpoint
from wanpack.convert.synth import synth_checkpoint
from wanpack.errors import PackBusyError, UsageError
from wanpack.manifests.pack_lock import CONVERT, PIN, lock_path, pinned_pack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("writers") / "src"
    synth_checkpoint(out, "wan2.1-t2v-14b", layers=1, dim_scale="tiny", components=("dit",))
    return out


def manifest_bytes(pack: Path) -> bytes:
    return (pack / "manifest.json").read_bytes()


def hidden(folder: Path) -> list[str]:
    """Hidden pack folders left beside the packs (lock files are meant to stay)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.is_dir())


def convert(src: Path, out: Path, quant: str = "int8", force: bool = False, log=None):
    return convert_checkpoint(src, out, ConvertOptions(quant=quant, force=force), log=log)


def test_force_replaces_by_exchange_when_the_kernel_can(src, tmp_path, monkeypatch):
    pack = tmp_path / "pack"
    convert(src, pack)
    results = []
    real = atomic.exchange
    monkeypatch.setattr(atomic, "exchange", lambda a, b: results.append(real(a, b)) or results[-1])
    convert(src, pack, quant="fp8", force=True)
    assert b'"fp8"' in manifest_bytes(pack)
    assert results == [True] or not sys.platform.startswith("linux")  # one swap, done by the kernel
    assert hidden(tmp_path) == []  # the old pack, exchanged into the temporary name, is gone


@pytest.mark.parametrize("how", ["exchange fails", "fallback: second rename fails"])
def test_failed_replacement_keeps_the_old_pack(src, tmp_path, monkeypatch, how):
    pack = tmp_path / "pack"
    convert(src, pack)
    before = manifest_bytes(pack)
    if how == "exchange fails":
        def broken_exchange(a, b):
            raise OSError(errno.EIO, "Input/output error", str(b))

        monkeypatch.setattr(atomic, "exchange", broken_exchange)
    else:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # as on a filesystem without RENAME_EXCHANGE
        real_rename = os.rename

        def rename(a, b):
            if ".wanpack-tmp-" in str(a):  # putting the new pack in place
                raise OSError(errno.EIO, "Input/output error", str(a))
            return real_rename(a, b)

        monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        convert(src, pack, quant="fp8", force=True)
    assert manifest_bytes(pack) == before  # the old pack is back in place, whole
    assert hidden(tmp_path) == []


def test_fallback_without_exchange_replaces_and_cleans_up(src, tmp_path, monkeypatch):
    pack = tmp_path / "pack"
    convert(src, pack)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    convert(src, pack, quant="fp8", force=True)
    assert b'"fp8"' in manifest_bytes(pack) and hidden(tmp_path) == []


@pytest.mark.parametrize("mark", [".wanpack-old-4242-abcd", ".wanpack-tmp-old-4242"])  # ours, and wanpack 0.1's name
def test_crash_between_renames_is_recovered_not_deleted(src, tmp_path, mark):
    pack = tmp_path / "pack"
    convert(src, pack)
    before = manifest_bytes(pack)
    os.rename(pack, tmp_path / f".pack{mark}")  # what a kill -9 between the fallback's two renames leaves
    (tmp_path / ".pack.wanpack-tmp-999-dead").mkdir()  # and the new pack's unfinished temporary folder
    notes = []
    with pytest.raises(UsageError, match="already exists"):
        convert(src, pack, log=notes.append)  # the user runs the same command again, without --force
    assert manifest_bytes(pack) == before and hidden(tmp_path) == []
    assert any("recovered the previous pack" in n for n in notes)


def test_second_conversion_to_the_same_out_is_refused(src, tmp_path):
    """Another process converting to the same --out holds the convert lock; its temporary folder is not stale, whatever
    its PID looks like from here. Killed with -9, it holds nothing, and its folder is cleaned up."""
    pack = tmp_path / "pack"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(lock_path(pack, CONVERT))], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        live = tmp_path / f".pack.wanpack-tmp-{holder.pid}-live"
        live.mkdir()
        (live / "block_0.safetensors").write_bytes(b"being written")
        with pytest.raises(PackBusyError, match="another wanpack convert is writing"):
            convert(src, pack)
        res = CliRunner().invoke(app, ["convert", str(src), "--out", str(pack)])
        assert res.exit_code == 1 and "another wanpack convert" in res.output and "Traceback" not in res.output
        assert (live / "block_0.safetensors").exists() and not pack.exists()  # the owner's folder is untouched
    finally:
        holder.kill()
        holder.wait()
    convert(src, pack)
    assert not live.exists() and (pack / "manifest.json").is_file()


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_force_waits_for_a_pinned_run_and_the_run_keeps_its_pack(src, tmp_path):
    pack = tmp_path / "pack"
    convert(src, pack)
    before = manifest_bytes(pack)
    waiting, errors = threading.Event(), []

    def replace() -> None:
        try:
            convert(src, pack, quant="fp8", force=True, log=lambda m: "waiting for the runs" in m and waiting.set())
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    with pinned_pack(pack) as pin:
        assert pin.pinned and pin.manifest_sha256 == hashlib.sha256(before).hexdigest()
        worker = threading.Thread(target=replace)
        worker.start()
        assert waiting.wait(60), "the conversion never reached the swap"
        assert manifest_bytes(pack) == before  # the run still sees every byte of the pack it planned
    worker.join(60)
    assert not errors and b'"fp8"' in manifest_bytes(pack)


def test_pin_is_shared_and_held_for_the_whole_run(src, tmp_path, monkeypatch):
    """`wanpack run` pins the pack for its session (the checks made against the manifest it runs on included) and
    keeps it pinned; other runs may pin it too. (The first, cheap checks run before the session, unpinned.)"""
    from wanpack.runtime import pipeline

    pack = tmp_path / "pack"
    convert(src, pack)
    seen = {}
    def probe(req, manifest=None):
        if manifest is None:
            return None  # the early check (this dit-only pack would fail it: no T5)
        fd = os.open(lock_path(pack, PIN), os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what convert --force asks for
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another run is welcome
            seen["pinned"] = True
        finally:
            os.close(fd)
        raise PackBusyError("stop after the probe")

    monkeypatch.setattr(pipeline, "check_request", probe)
    monkeypatch.setattr(pipeline, "check_budgets", lambda req, checked: None)  # it plans what the early check found
    res = CliRunner().invoke(app, ["run", "--pack", str(pack), "--prompt", "x", "--out", str(tmp_path / "v.mp4")])
    assert seen == {"pinned": True} and "stop after the probe" in res.output
    fd = os.open(lock_path(pack, PIN), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the run ended
    os.close(fd)
