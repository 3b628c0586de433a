"""Checking a pack's files against its manifest: every file it lists (shards and extra files such as the tokenizer)
for size and sha256, and each shard's safetensors header for the offsets, dtypes and shapes the manifest records.

Files are opened the way the runtime opens them (manifests/pack_files.py): inside the pack after resolving symlinks,
regular files only, so a hostile pack cannot make `verify` hash /dev/zero or block on a FIFO.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from wanpack.convert.safetensors_io import StHeader
from wanpack.convert.sources import sha256_file
from wanpack.errors import PackFormatError, SourceError
from wanpack.manifests.format import ShardEntry, read_manifest
from wanpack.manifests.pack_files import open_pack_file


@dataclass
class VerifyReport:
    """What `wanpack verify` found; an empty ``problems`` means every recorded size and hash matched."""

    checked: int = 0
    problems: dict[str, str] = field(default_factory=dict)  # relative path -> what is wrong
    unrecorded: list[str] = field(default_factory=list)  # listed files with no recorded hash (format-1 packs)


def verify_pack(pack: str | os.PathLike) -> VerifyReport:
    """Check every file the manifest lists; see the module docstring."""
    pack = Path(pack)
    manifest = read_manifest(pack)
    report = VerifyReport()
    for comp in manifest.components.values():
        listed = [(s.path, s.size, s.sha256, s) for s in comp.shards]
        listed += [(f.path, f.size, f.sha256, None) for f in comp.files]
        for rel, size, sha, shard in listed:
            report.checked += 1
            if sha is None:
                report.unrecorded.append(rel)
            problem = _check_file(pack, rel, size, sha, shard)
            if problem:
                report.problems[rel] = problem
    return report


def _check_file(pack: Path, rel: str, size: int | None, sha: str | None, shard: ShardEntry | None) -> str | None:
    """What is wrong with one listed file, or None."""
    if not os.path.lexists(pack / rel):
        return "missing"
    try:
        fd, path = open_pack_file(pack, rel, size)
    except PackFormatError as exc:
        return str(exc)
    digest = sha256_file(fd) if sha is not None else None  # reads and closes fd
    if sha is None:
        os.close(fd)
    elif digest != sha:
        return f"sha256 {digest[:16]}... != {sha[:16]}... in the manifest"
    if shard is None:
        return None
    try:
        header = StHeader.read(path)
    except SourceError as exc:
        return str(exc)
    for t in shard.tensors:
        info = header.tensors.get(t.name)
        if info is None or (info.offset, info.length, info.dtype, list(info.shape)) != (t.offset, t.length, t.dtype,
                                                                                         t.shape):  # fmt: skip
            return f"header disagrees with the manifest about {t.name} (offset, length, dtype or shape)"
    return None
