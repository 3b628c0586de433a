"""Start the drive on the pack's first bytes while the interpreter is still importing torch.

A `wanpack run` spends 3-4 s before its session exists (Python, torch, CUDA). On a cold page cache the drive sits idle
through all of it, then the text encoder waits for its blocks. This module is imported before torch and asks the
kernel to read ahead (``posix_fadvise(WILLNEED)``, on a daemon thread, since the call returns only once its reads are
queued): the text encoder's blocks first (always mapped through the page cache), then - only when the RAM plainly
holds the whole pack, so the run will read it cached too - the DiT's shards in the order the first step needs them.

Advice only: nothing is read into this process, a pack that is damaged or absent is left to the session to report,
and the files opened follow the pack's containment rules (manifests/pack_files.py). Set WANPACK_EARLY_READ=0 to turn
it off (benchmarks compare both).
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from wanpack.errors import WanpackError
from wanpack.manifests.pack_files import open_pack_file

HEADROOM = 1.5  # the whole pack is read ahead only when this many times its size is free (or budgeted)
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

    order = [path for name in task_components for _, path in blocks(name)]
    total = sum(int(s.get("size", 0)) for c in comps.values() for s in (c.get("shards") or []))
    cached = read_mode == "cached" or (read_mode is None and ram_bytes is not None and ram_bytes >= HEADROOM * total)
    if cached and "dit" in comps:
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
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            return
        finally:
            os.close(fd)


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
