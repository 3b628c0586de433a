"""`wanpack serve`: a job queue in front of one Session, over HTTP (FastAPI; `pip install wanpack[serve]`).

The pack is opened and planned once; jobs run one at a time on a worker thread that owns the GPU, so the DiT's host
cache, the encoders' pinned blocks and the tuned kernels carry over from job to job. A bad job is refused with a 4xx
JSON error before it is queued; a job that fails while running is marked failed and the next one runs.

    POST /v1/jobs            {"prompt": ..., "image_base64": ..., "seed": ..., any run setting} -> 201 {"id", ...}
    GET  /v1/jobs/{id}       state (queued | running | done | failed), progress, result paths, error
    GET  /v1/jobs/{id}/video the mp4 once done
    GET  /v1/health          pack, device, queue length, jobs done

Outputs go to --out-dir as <id>.mp4 + <id>.json; clients never choose paths. Images arrive as base64 in the body (at
most MAX_IMAGE_BYTES) and are written next to the outputs; the usual image checks apply when the job is validated.
"""

import base64
import binascii
import itertools
import queue
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wanpack.errors import UsageError, WanpackError
from wanpack.manifests.run_config import normalize_layer, resolve_run_config
from wanpack.runtime.session import Job, Session

MAX_IMAGE_BYTES = 32 << 20
BODY_KEYS = ("prompt", "image_base64")
IMAGE_SUFFIXES = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg", b"RIFF": ".webp", b"GIF8": ".gif", b"BM": ".bmp"}


@dataclass
class JobStatus:
    """What GET /v1/jobs/{id} reports."""

    id: str
    state: str = "queued"
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    video: str | None = None
    sidecar: str | None = None
    seed: int | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class JobServer:
    """The queue, the worker thread and the session; HTTP-free, so tests and other front ends can drive it."""

    def __init__(self, pack: Path, out_dir: Path, *, preset: str | None = None, config: Path | None = None,
                 overrides: dict[str, Any] | None = None, device: str | None = None, synthetic: bool = False,
                 log=lambda message: print(message, file=sys.stderr)):  # fmt: skip
        self.pack, self.out_dir = Path(pack), Path(out_dir)
        self.preset, self.config, self.synthetic, self.log = preset, config, synthetic, log
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        resolve_run_config(preset, config, self.overrides)  # a bad base config fails at start, not per job
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.session = Session(self.pack, device, jobs=1_000_000)  # "many": keep engines and caches between jobs
        self.jobs: dict[str, JobStatus] = {}
        self._specs: dict[str, Job] = {}
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="wanpack-serve", daemon=True)
        self._worker.start()

    # -------------------------------------------------------------------------------------------- submitting

    def submit(self, body: Any) -> JobStatus:
        """Validate a job body and queue it; UsageError (-> HTTP 400) names what is wrong."""
        from wanpack.runtime.pipeline import check_request

        if not isinstance(body, dict):
            raise UsageError('the body must be a JSON object like {"prompt": "a fox in the snow"}')
        body = dict(body)
        prompt = body.pop("prompt", None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError('"prompt" must be a non-empty string - say what the video shows')
        job_id = f"{next(self._seq):05d}-{uuid.uuid4().hex[:8]}"
        image = self._save_image(job_id, body.pop("image_base64", None))
        try:
            layer = normalize_layer(body, "job")
            cfg = resolve_run_config(self.preset, self.config, {**self.overrides, **layer})
            job = Job(prompt=prompt, out=self.out_dir / f"{job_id}.mp4", config=cfg, image=image,
                      synthetic=self.synthetic, command=["wanpack", "serve"], label=f"job {job_id}")  # fmt: skip
            check_request(job.as_request(self.pack), manifest=self.session.manifest)
        except BaseException:
            if image is not None:
                image.unlink(missing_ok=True)
            raise
        status = JobStatus(job_id)
        with self._lock:
            self.jobs[job_id], self._specs[job_id] = status, job
        self._queue.put(job_id)
        return status

    def _save_image(self, job_id: str, data: Any) -> Path | None:
        if data is None:
            return None
        if not isinstance(data, str):
            raise UsageError('"image_base64" must be a base64 string of a PNG or JPEG file')
        if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise UsageError(f'"image_base64" is over {MAX_IMAGE_BYTES >> 20} MiB - send a smaller image')
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError('"image_base64" is not valid base64 - encode the image file\'s bytes') from None
        suffix = next((s for magic, s in IMAGE_SUFFIXES.items() if raw.startswith(magic)), ".img")
        path = self.out_dir / f"{job_id}.input{suffix}"
        path.write_bytes(raw)
        return path

    # -------------------------------------------------------------------------------------------- reading

    def status(self, job_id: str) -> JobStatus:
        with self._lock:
            if job_id not in self.jobs:
                raise KeyError(job_id)
            return self.jobs[job_id]

    def queued(self) -> int:
        return self._queue.qsize()

    # -------------------------------------------------------------------------------------------- running

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                status, job = self.jobs[job_id], self._specs.pop(job_id)
                status.state, status.started = "running", time.time()
            try:
                record = self.session.generate(job, self._reporter(status))
            except WanpackError as exc:
                self._finish(status, "failed", error=str(exc))
            except Exception as exc:  # noqa: BLE001 - one broken job must not take the server down
                self.log(f"job {job_id} failed:\n{traceback.format_exc()}")
                self._finish(status, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
            else:
                self._finish(status, "done", video=record.video, sidecar=str(Path(record.video).with_suffix(".json")),
                             seed=record.seed, timings_s=record.timings_s)  # fmt: skip
                self.log(f"job {job_id} done: {record.video} ({record.timings_s.get('total', 0):.1f} s)")

    def _finish(self, status: JobStatus, state: str, **fields) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(status, k, v)
            status.state, status.finished = state, time.time()

    def _reporter(self, status: JobStatus):
        def report(event: str, info: dict) -> None:
            with self._lock:
                if event == "stage":
                    status.progress = {"stage": info["name"]}
                elif event == "step":
                    status.progress.update({"step": info["step"], "steps": info["steps"]})
                elif event == "frames":
                    status.progress.update({"frames": info["done"], "total_frames": info["total"]})

        return report

    def close(self) -> None:
        """Stop taking jobs, let the running one finish, free the session."""
        self._stop.set()
        self._worker.join()
        self.session.close()


def create_app(server: JobServer):
    """The FastAPI application over a JobServer. (This module has no ``from __future__ import annotations``: FastAPI
    reads the endpoint annotations at runtime to see which argument is the Request.)"""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import FileResponse, JSONResponse
    except ImportError:
        raise UsageError("wanpack serve needs FastAPI and uvicorn - pip install 'wanpack[serve]'") from None

    app = FastAPI(title="wanpack", summary="Wan2.1 video generation from one loaded pack")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body is not JSON - send a JSON object like {\"prompt\": \"a fox\"}")
        try:
            status = server.submit(body)
        except UsageError as exc:
            return error(400, str(exc))
        except WanpackError as exc:
            return error(422, str(exc))
        return JSONResponse({"id": status.id, "state": status.state, "queued": server.queued()}, status_code=201)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str):
        try:
            return server.status(job_id).to_dict()
        except KeyError:
            return error(404, f"no job {job_id!r} - POST /v1/jobs first")

    @app.get("/v1/jobs/{job_id}/video")
    def get_video(job_id: str):
        try:
            status = server.status(job_id)
        except KeyError:
            return error(404, f"no job {job_id!r}")
        if status.state != "done" or status.video is None:
            return error(409, f"job {job_id} is {status.state}, not done - poll GET /v1/jobs/{job_id}")
        return FileResponse(status.video, media_type="video/mp4", filename=Path(status.video).name)

    @app.get("/v1/health")
    def health():
        s = server.session
        return {"ok": True, "pack": str(server.pack), "device": str(s.device), "queued": server.queued(),
                "jobs_done": s.jobs_done}  # fmt: skip

    return app
