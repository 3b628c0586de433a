"""The JSON sidecar next to every video: what was run, with which seed and pack, how long each stage took, peak memory.

A run is reproducible from its sidecar: the command, the full resolved RunConfig, the seed actually used and the
sha256 of the pack's manifest.json (which pins every byte of the weights through its per-shard checksums).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from wanpack.runtime.video import atomic_path


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (e.g. PACK/manifest.json for the sidecar's manifest hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes); None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_vram_bytes() -> dict[str, int] | None:
    """Peak allocated and reserved CUDA memory since the last reset, or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


class StageTimer:
    """Wall-clock seconds per pipeline stage (t5, clip, vae_encode, denoise, vae_decode, write, ...).

    With ``sync=True`` it synchronizes CUDA at each stage boundary, so GPU work is charged to the stage that queued
    it. That is one sync per stage, outside every hot loop.
    """

    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass
class RunRecord:
    """Everything the sidecar records; the pipeline fills it as it goes and writes it last."""

    command: list[str]
    seed: int
    config: dict[str, Any]  # RunConfig.to_dict()
    pack: str | None = None  # pack folder, None for the embedded demo model
    manifest_sha256: str | None = None
    synthetic_weights: bool = False  # random weights (the embedded demo): the video shows noise patterns, not content
    prompt: str | None = None
    image: str | None = None
    video: str | None = None
    latents: str | None = None
    backends: dict[str, str] = field(default_factory=dict)  # ops.report.backend_info after denoising
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_vram_bytes: dict[str, int] | None = None
    peak_rss_bytes: int | None = None
    environment: dict[str, str] = field(default_factory=dict)
    created_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def finish(self, timer: StageTimer | None = None) -> RunRecord:
        """Fill timings, peak memory and the environment at the end of the run."""
        if timer is not None:
            self.timings_s = {k: round(v, 4) for k, v in timer.seconds.items()}
            self.timings_s["total"] = round(timer.total, 4)
        self.peak_vram_bytes = peak_vram_bytes()
        self.peak_rss_bytes = peak_rss_bytes()
        self.environment = _environment()
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _environment() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        wanpack_version = version("wanpack")
    except PackageNotFoundError:
        wanpack_version = "unknown"
    env = {"wanpack": wanpack_version, "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def sidecar_path(video_path: str | os.PathLike) -> Path:
    """video.mp4 -> video.json"""
    return Path(video_path).with_suffix(".json")


def write_sidecar(path: str | os.PathLike, record: RunRecord | Mapping[str, Any]) -> Path:
    """Write the record as indented JSON, atomically."""
    data = record.to_dict() if isinstance(record, RunRecord) else dict(record)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return Path(path)
