"""Checking a pack's files against its manifest: sizes, sha256, and the safetensors headers' offsets."""

from __future__ import annotations

import os
from pathlib import Path

from wanpack.convert.safetensors_io import StHeader
from wanpack.convert.sources import sha256_file
from wanpack.errors import SourceError
from wanpack.manifests.format import read_manifest


def verify_pack(pack: str | os.PathLike) -> tuple[dict[str, str], int]:
    """Return ({relative path: what is wrong}, number of files checked); an empty dict means the pack is intact."""
    pack = Path(pack)
    manifest = read_manifest(pack)
    problems: dict[str, str] = {}
    checked = 0
    for comp in manifest.components.values():
        for shard in comp.shards:
            checked += 1
            path = pack / shard.path
            if not path.is_file():
                problems[shard.path] = "missing"
                continue
            size = path.stat().st_size
            if size != shard.size:
                problems[shard.path] = f"size {size} != {shard.size} in the manifest"
                continue
            digest = sha256_file(path)
            if digest != shard.sha256:
                problems[shard.path] = f"sha256 {digest[:16]}... != {shard.sha256[:16]}... in the manifest"
                continue
            try:
                header = StHeader.read(path)
            except SourceError as exc:
                problems[shard.path] = str(exc)
                continue
            for t in shard.tensors:
                info = header.tensors.get(t.name)
                if info is None or (info.offset, info.length, info.dtype) != (t.offset, t.length, t.dtype):
                    problems[shard.path] = f"header disagrees with the manifest about {t.name}"
                    break
    return problems, checked
