"""Start the drive on the pack's first bytes while the interpreter is still importing torch.

A `wanpack run` spends 3-4 s before its session exists (Python, torch, CUDA). On a cold page cache the drive sits idle
through all of it, then the text encoder waits for its blocks. This module is imported before torch and asks the
kernel to read ahead (``posix_fadvise(WILLNEED)``, on a daemon thread, since the call returns only once its reads are
queued), only when the RAM plainly holds the whole pack (so the run will read it through the page cache too): the text
encoder's blocks first, then the DiT's shards in the order the first step needs them. Files already in the page
cache are skipped after a residency look (mincore): on a warm pack the thread ends at once.

Advice only: nothing is read into this process, a pack that is damaged or absent is left to the session to report,
and the files opened follow the pack's containment rules (manifests/pack_files.py). Set WANPACK_EARLY_READ=0 to turn
it off (benchmarks compare both).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import threading
from pathlib import Path

from wanpack.errors import WanpackError
from wanpack.manifests.pack_files import open_pack_file

HEADROOM = 1.5  # the whole pack is read ahead only when this many times its size is free (or budgeted)
RESIDENT_ENOUGH = 0.98  # a file this much in the page cache already is left alone
_BLOCK = re.compile(r"block_(\d+)\.safetensors$")


def early_read_order(manifest: dict, task_components: tuple[str, ...], ram_bytes: int | None,
                     read_mode: str | None) -> list[str]:  # fmt: skip
    """Shard paths to read ahead, first needed first: the encoders' block shards (not their non-block shard: the T5's
    token table is read row by row), then, when the run will read cached, the DiT's non-block shard and its blocks."""
    comps = manifest.get("components") or {}

    def blocks(name: str) -> list[tuple[int, str]]:
        out = []
        for shard in (comps.get(name) or {}).get("shards") or []:
            match = _BLOCK.search(str(shard.get("path", "")))
            if match:
                out.append((int(match.group(1)), shard["path"]))
        return sorted(out)

    total = sum(int(s.get("size", 0)) for c in comps.values() for s in (c.get("shards") or []))
    cached = read_mode == "cached" or (read_mode is None and ram_bytes is not None and ram_bytes >= HEADROOM * total)
    if not cached:  # O_DIRECT runs read the encoders O_DIRECT too: pages read ahead would be read twice
        return []
    order = [path for name in task_components for _, path in blocks(name)]
    if "dit" in comps:
        order += [s["path"] for s in comps["dit"].get("shards") or [] if not _BLOCK.search(str(s.get("path", "")))]
        order += [path for _, path in blocks("dit")]
    return order


def _advise(pack: Path, paths: list[str]) -> None:
    for rel in paths:
        try:
            fd, _ = open_pack_file(pack, rel)
        except WanpackError:
            return  # the session says what is wrong with the pack
        try:
            if resident_fraction(fd) < RESIDENT_ENOUGH:  # a warm pack costs a residency look per file, no page walk
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            return
        finally:
            os.close(fd)


def resident_fraction(fd: int) -> float:
    """The share of the file's pages in the page cache (mincore on a fresh read-only mapping); 0.0 where it cannot
    be asked, so the readahead is queued anyway."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 1.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    except (OSError, AttributeError):
        return 0.0
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return 0.0
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(addr, size, vec) != 0:
            return 0.0
        return (pages - vec.raw.count(0)) / pages  # bit 0 set: resident (the other bits are reserved, zero)
    finally:
        libc.munmap(addr, size)


def start_early_read(pack: Path | None, *, ram_budget_gib: float | None = None, read_mode: str | None = None,
                     image: bool = False) -> threading.Thread | None:  # fmt: skip
    """Queue the readahead described above on a daemon thread; None when there is nothing to do or it is off."""
    if pack is None or os.environ.get("WANPACK_EARLY_READ", "1") == "0" or not hasattr(os, "posix_fadvise"):
        return None
    try:
        manifest = json.loads((pack / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    ram = int(ram_budget_gib * (1 << 30)) if ram_budget_gib else available_ram()
    paths = early_read_order(manifest, ("t5", "clip") if image else ("t5",), ram, read_mode)
    if not paths:
        return None
    thread = threading.Thread(target=_advise, args=(pack, paths), name="wanpack-early-read", daemon=True)
    thread.start()
    return thread


def available_ram() -> int | None:
    """MemAvailable of this machine in bytes, or None; imports nothing heavy and touches no GPU."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
