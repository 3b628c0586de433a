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

from wanpack.runtime.ops.devices import wait_for_gpu
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


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of this process's live threads, summed by thread name (digits dropped, so the
    eight disk workers are one line); where a run spends CPU while the GPU works. Empty where /proc is missing."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")].rstrip("0123456789-_") or "?"
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        out[name] = round(out.get(name, 0.0) + seconds, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def process_age_s() -> float | None:
    """Seconds since this process started (interpreter start, imports and CUDA start included)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


def peak_vram_bytes() -> dict[str, int] | None:
    """Peak allocated and reserved CUDA memory since the last reset, or None without a GPU."""
    if not torch.cuda.is_available():
        return None
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


class StageTimer:
    """Wall-clock seconds per pipeline stage (t5, clip, vae_encode, denoise, vae_decode, write, ...), and the CPU
    seconds spent meanwhile: by the whole process and by the thread that ran the stage (where a run's CPU time goes).

    With ``sync=True`` it synchronizes CUDA at each stage boundary, so GPU work is charged to the stage that queued
    it. That is one sync per stage, outside every hot loop.
    """

    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, dict[str, float]] = {}  # stage -> {"process": s, "thread": s}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.sync:
            wait_for_gpu()
        start, process, thread = time.perf_counter(), time.process_time(), time.thread_time()
        try:
            yield
        finally:
            if self.sync:
                wait_for_gpu()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            spent = self.cpu.setdefault(name, {"process": 0.0, "thread": 0.0})
            spent["process"] += time.process_time() - process
            spent["thread"] += time.thread_time() - thread

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
    synthetic_weights: bool = False  # random weights (the demo, or a `wanpack synth` pack): noise patterns, not content
    prompt: str | None = None
    image: str | None = None
    video: str | None = None
    latents: str | None = None
    size: dict[str, int] = field(default_factory=dict)  # what was made: height, width, frames (i2v: from the image)
    plan: dict[str, Any] = field(default_factory=dict)  # how: the DiT's and encoders' plans, read mode, budgets
    backends: dict[str, str] = field(default_factory=dict)  # GEMM / attention / norm kernels that ran
    encoder: dict[str, Any] = field(default_factory=dict)  # video encoder settings and its timing
    io: dict[str, Any] = field(default_factory=dict)  # pack bytes read, of which from storage (not the page cache)
    details: dict[str, Any] = field(default_factory=dict)  # sub-phase times: per step, T5 engine, tokenizer wait
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_vram_bytes: dict[str, int] | None = None
    peak_rss_bytes: int | None = None
    cpu_s: float | None = None  # process CPU time (user + system) so far
    stage_cpu_s: dict[str, dict[str, float]] = field(default_factory=dict)  # per stage: process and stage thread
    environment: dict[str, str] = field(default_factory=dict)
    created_utc: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def finish(self, timer: StageTimer | None = None) -> RunRecord:
        """Fill timings, peak memory and the environment at the end of the run."""
        if timer is not None:
            self.timings_s = {k: round(v, 4) for k, v in timer.seconds.items()}
            self.timings_s["total"] = round(timer.total, 4)
            self.stage_cpu_s = {k: {kind: round(v, 3) for kind, v in spent.items()} for k, spent in timer.cpu.items()}
        self.peak_vram_bytes = peak_vram_bytes()
        self.peak_rss_bytes = peak_rss_bytes()
        times = os.times()
        self.cpu_s = round(times.user + times.system, 3)
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


def latents_path(video_path: str | os.PathLike) -> Path:
    """video.mp4 -> video.latents.safetensors (--save-latents)"""
    return Path(video_path).with_suffix(".latents.safetensors")


def write_sidecar(path: str | os.PathLike, record: RunRecord | Mapping[str, Any]) -> Path:
    """Write the record as indented JSON, atomically."""
    data = record.to_dict() if isinstance(record, RunRecord) else dict(record)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return Path(path)
