"""`wanpack run --prompts FILE.jsonl`: many videos from one load, every line checked before any heavy work.

One JSON object per line (blank lines are skipped):

    {"prompt": "a fox in the snow", "seed": 7}
    {"prompt": "the cat yawns", "image": "cat.png", "out": "cat.mp4", "steps": 8}

``prompt`` is required; ``image`` (relative to the file's folder), ``out`` (a .mp4 name inside --out-dir; default
``<file>-<line>.mp4``) are optional, and every other key is a run setting, checked like a --config key (unknown keys
are errors naming the line). Settings merge as preset < --config < command-line flags < the line. A video (or its
sidecar or latent) that already exists is refused, naming the line, unless ``overwrite`` (`run --overwrite`).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from wanpack.errors import UsageError
from wanpack.manifests.format import read_manifest
from wanpack.manifests.run_config import normalize_layer, resolve_run_config
from wanpack.runtime.session import Job

JOB_KEYS = ("prompt", "image", "out")


def load_jobs(path: Path, pack: Path, out_dir: Path, preset: str | None, config: Path | None,
              overrides: dict[str, Any], *, synthetic: bool = False, command: list[str] | None = None,
              overwrite: bool = False) -> list[Job]:  # fmt: skip
    """Parse and check every line; raises UsageError naming the first bad line. Creates ``out_dir`` if missing."""
    from wanpack.runtime.pipeline import check_request

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --prompts {path} ({getattr(exc, 'strerror', None) or exc}) - check the path") from None
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is not a folder - choose another")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(pack)
    flags = {k: v for k, v in overrides.items() if v is not None}
    jobs: list[Job] = []
    outs: dict[Path, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        job = _job(line, where, path, out_dir, preset, config, flags, synthetic, command or [])
        job.overwrite, job.config_file = overwrite, config
        if job.out.resolve() in outs:
            raise UsageError(f"{where}: writes {job.out.name}, as {outs[job.out.resolve()]} does - give each line its own \"out\"")
        outs[job.out.resolve()] = where
        try:
            check_request(job.as_request(pack), manifest=manifest)
        except UsageError as exc:
            raise UsageError(f"{where}: {exc}") from None
        jobs.append(job)
    if not jobs:
        raise UsageError(f"--prompts {path} has no jobs - write one JSON object per line, e.g. {{\"prompt\": \"a fox\"}}")
    return jobs


def _job(line: str, where: str, path: Path, out_dir: Path, preset, config, flags: dict, synthetic: bool,
         command: list[str]) -> Job:  # fmt: skip
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON ({exc.msg}) - write one JSON object per line") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where}: must be a JSON object like {{\"prompt\": \"a fox\"}}")
    prompt = data.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError(f"{where}: \"prompt\" must be a non-empty string - say what the video shows")
    image = data.pop("image", None)
    if image is not None and not isinstance(image, str):
        raise UsageError(f"{where}: \"image\" must be a file path string")
    out = _out_path(data.pop("out", None), where, path, out_dir)
    layer = normalize_layer(data, where)
    try:
        cfg = resolve_run_config(preset, config, {**flags, **layer})
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    image_path = None if image is None else (path.parent / image if not Path(image).is_absolute() else Path(image))
    return Job(prompt=prompt, out=out, config=cfg, image=image_path, synthetic=synthetic, command=command, label=where)


def _out_path(value, where: str, path: Path, out_dir: Path) -> Path:
    if value is None:
        return out_dir / f"{path.stem}-{where.rsplit(' ', 1)[-1]:0>3}.mp4"
    rel = PurePosixPath(value) if isinstance(value, str) else None
    if rel is None or rel.is_absolute() or ".." in rel.parts or "\\" in value or not value.strip():
        raise UsageError(f"{where}: \"out\" must be a file name inside --out-dir (no folders above it), got {value!r}")
    if rel.suffix.lower() != ".mp4":
        raise UsageError(f"{where}: \"out\" must end in .mp4, got {value!r}")
    target = out_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    return target
