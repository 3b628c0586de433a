"""Video and latent output: H.264 mp4 through PyAV, written atomically so an existing file is never left corrupt.

Every writer goes to a temporary file in the destination folder and renames it over the target only once the file
is complete; a failure (or Ctrl-C) leaves the old file, if any, untouched. ``check_outputs``, ``check_output_path`` and
``require_av`` let the pipeline fail on a path that would lose data, an unwritable path or a missing PyAV before any
heavy work starts.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from wanpack.errors import UsageError, WanpackError

DEFAULT_FPS = 16
DEFAULT_CRF = 18  # x264 constant-quality level: visually near-lossless for generated video, ~4x smaller than crf 0
VIDEO_SUFFIX = ".mp4"  # the one container the writers produce
# Chosen for speed (measured on 81 noise frames at 832x480, 2 cores: medium 4.4 s of which 2.0 s after the last
# frame; veryfast + zerolatency 0.8 s, nothing after the last frame): no lookahead and no B-frames, so every frame is
# encoded as it arrives and closing the file costs nothing. crf 18 keeps the quality; files are somewhat larger.
ENCODER_SETTINGS = {"codec": "libx264", "pix_fmt": "yuv420p", "crf": str(DEFAULT_CRF), "preset": "veryfast",
                    "tune": "zerolatency"}  # fmt: skip
# When every frame arrives at once (a tiled VAE decode finishes all frames together) nothing hides the encoder, so it
# must be quick: on an H200 host (16 cores, 81 noise frames) ultrafast took 0.24 s at 480p and 0.41 s at 720p against
# 0.49 / 0.78 s for veryfast, for files about 1.5x larger at the same crf.
BURST_ENCODER_SETTINGS = {**ENCODER_SETTINGS, "preset": "ultrafast"}


def require_av():
    """Import PyAV, or say how to get it."""
    try:
        import av
    except ImportError:
        raise WanpackError("PyAV is not installed, so no mp4 can be written - pip install av") from None
    return av


def check_output_path(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Fail now, not after sampling, if ``path`` cannot be written: missing folder, a directory, no permission.
    ``flag`` is the option that named the path, for the message."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory - give a file name such as {path / 'video.mp4'}")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"output folder {parent} is not a folder - choose another {flag}")
    if not parent.is_dir():
        raise UsageError(f"output folder {parent} does not exist - create it or choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to {parent} ({exc.strerror or exc}) - choose a writable {flag}") from None
    return path


def check_outputs(outputs: Sequence[str | os.PathLike], inputs: Mapping[str, str | os.PathLike | None],
                  overwrite: bool = False) -> list[Path]:  # fmt: skip
    """Refuse, before any work, every output that would lose data; ``outputs[0]`` is the video (--out).

    An output may not be one of the ``inputs`` (flag -> path), two outputs may not share a path, the video must be
    named for the container it is written as, and an existing file is replaced only with ``overwrite``.
    """
    paths = [Path(p) for p in outputs]
    video = paths[0]
    for path in paths:
        for flag, source in inputs.items():
            if source is not None and _same_file(path, Path(source)):
                raise UsageError(f"--out {video} would write {path} over the {flag} input {source} - choose another --out")
    if video.suffix.lower() != VIDEO_SUFFIX:
        raise UsageError(f"--out {video}: wanpack writes H.264 mp4 files only - give a name ending in {VIDEO_SUFFIX}")
    for i, path in enumerate(paths):
        if any(_same_file(path, other) for other in paths[:i]):
            raise UsageError(f"--out {video}: two outputs would share the path {path} - choose another --out")
        check_output_path(path)
        if path.exists() and not overwrite:
            raise UsageError(f"{path} already exists - pass --overwrite to replace it, or choose another --out")
    return paths


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links, relative parts and hard links where both exist)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.absolute().resolve() == b.absolute().resolve()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on any failure delete it."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result the user's usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _frame_iter(frames: torch.Tensor | np.ndarray) -> tuple[int, int, int, Iterator[np.ndarray]]:
    """(F, H, W, iterator of [H, W, 3] uint8) from [F,H,W,3] uint8 or [3,F,H,W] / [1,3,F,H,W] float in [-1, 1].

    Float frames are converted one at a time so a 720p clip never needs a second full-size copy.
    """
    x = torch.from_numpy(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise UsageError(f"uint8 frames must be [F, H, W, 3], got {list(x.shape)} - this is a wanpack bug")
        return x.shape[0], x.shape[1], x.shape[2], (x[i].cpu().numpy() for i in range(x.shape[0]))
    if x.ndim == 5 and x.shape[0] == 1:
        x = x[0]
    if not x.is_floating_point() or x.ndim != 4 or x.shape[0] != 3:
        raise UsageError(f"float frames must be [3, F, H, W] in [-1, 1], got {list(x.shape)} {x.dtype} - wanpack bug")

    def convert(i: int) -> np.ndarray:
        f = x[:, i].detach().to("cpu", torch.float32).clamp(-1.0, 1.0)
        return ((f + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()

    return x.shape[1], x.shape[2], x.shape[3], (convert(i) for i in range(x.shape[1]))


def write_video(path: str | os.PathLike, frames: torch.Tensor | np.ndarray, fps: int = DEFAULT_FPS,
                crf: int = DEFAULT_CRF) -> Path:  # fmt: skip
    """Encode frames to an H.264 (yuv420p) mp4 at ``fps``; returns the path. See ``_frame_iter`` for frame layouts."""
    count, height, width, it = _frame_iter(frames)
    writer = VideoWriter(path, width, height, fps, {**ENCODER_SETTINGS, "crf": str(crf)}, background=False)
    try:
        for rgb in it:
            writer.put(torch.from_numpy(rgb)[None])
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return Path(path)


def to_uint8_frames(chunk: torch.Tensor) -> torch.Tensor:
    """Decoder output [1, 3, n, H, W] (or [3, n, H, W]) float in [-1, 1] -> [n, H, W, 3] uint8, on the same device.

    The same arithmetic as the CPU path (clamp, (x + 1) * 127.5, round), so doing it on the GPU changes no pixel and
    moves a quarter of the bytes over the bus.
    """
    x = chunk[0] if chunk.dim() == 5 else chunk
    x = x.float().clamp(-1.0, 1.0)
    return ((x + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()


class VideoWriter:
    """An mp4 written by a background thread while frames are still being made; the file appears only at close().

    ``put`` hands over [n, H, W, 3] uint8 CPU frames and returns at once; the encoder thread turns them into H.264
    packets as they come (ENCODER_SETTINGS: no lookahead, so nothing is left to do after the last frame but the
    container's index). ``close`` waits for the thread, renames the temporary file over ``path`` and reports how long
    it waited after the last frame. Any failure (disk full, permission) is raised from ``put`` or ``close`` as one
    line, and the temporary file is removed; ``abort`` drops everything.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: int = DEFAULT_FPS,
                 settings: Mapping[str, str] | None = None, background: bool = True):  # fmt: skip
        self.av = require_av()
        if height % 2 or width % 2 or width < 2 or height < 2:
            raise UsageError(f"cannot encode frames of {width}x{height} - H.264 needs even sizes")
        self.path = check_output_path(path)
        self.settings = dict(settings or ENCODER_SETTINGS)
        self.width, self.height, self.fps = width, height, fps
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(tmp)
        self.frames = 0
        self.encode_s = 0.0
        self.tail_s = 0.0  # wall time from the last put() to the file being complete
        self._error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._container = None
        self._stream = None
        self._thread = threading.Thread(target=self._work, name="wanpack-video", daemon=True) if background else None
        try:
            self._open()
        except BaseException:
            self._remove_tmp()
            raise
        if self._thread is not None:
            self._thread.start()

    def _open(self) -> None:
        self._container = self.av.open(str(self.tmp), mode="w", format="mp4")
        opts = {k: v for k, v in self.settings.items() if k not in ("codec", "pix_fmt")}
        self._stream = self._container.add_stream(self.settings.get("codec", "libx264"), rate=Fraction(self.fps))
        self._stream.width, self._stream.height = self.width, self.height
        self._stream.pix_fmt = self.settings.get("pix_fmt", "yuv420p")
        self._stream.options = opts

    def put(self, frames: torch.Tensor) -> None:
        """Queue [n, H, W, 3] uint8 frames (CPU); encoded in order on the writer thread."""
        if self._error is not None:
            raise self._failure()
        if frames.dtype != torch.uint8 or frames.dim() != 4 or tuple(frames.shape[1:]) != (self.height, self.width, 3):
            raise UsageError(f"frames must be [n, {self.height}, {self.width}, 3] uint8, got {list(frames.shape)} "
                             f"{frames.dtype} - this is a wanpack bug")  # fmt: skip
        self.frames += frames.shape[0]
        self._last_put = time.perf_counter()
        if self._thread is None:
            self._encode(frames)
        else:
            self._queue.put(frames)

    def _work(self) -> None:
        from wanpack.runtime.stream.reader import name_thread

        name_thread("wanpack-video")
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._encode(item)
                except BaseException as exc:  # noqa: BLE001 - reported by put/close in the caller's thread
                    self._error = exc

    def _encode(self, frames: torch.Tensor) -> None:
        t0 = time.perf_counter()
        for rgb in frames.numpy():
            for packet in self._stream.encode(self.av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                self._container.mux(packet)
        self.encode_s += time.perf_counter() - t0

    def close(self) -> Path:
        """Finish the file and move it into place; returns the path. Raises (and cleans up) on any failure."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        try:
            if self._error is not None:
                raise self._failure()
            if self.frames < 1:
                raise UsageError("no frames were written - this is a wanpack bug")
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None
            os.chmod(self.tmp, 0o666 & ~_umask())
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self._remove_tmp()
            raise _write_error(self.path, exc) from None
        except BaseException:
            self._remove_tmp()
            raise
        self.tail_s = time.perf_counter() - getattr(self, "_last_put", time.perf_counter())
        return self.path

    def abort(self) -> None:
        """Stop and delete the partial file (Ctrl-C, a failed decode)."""
        if self._thread is not None and self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join(timeout=30)
        self._remove_tmp()

    def _failure(self) -> BaseException:
        exc = self._error
        if isinstance(exc, OSError):
            return _write_error(self.path, exc)
        if isinstance(exc, self.av.FFmpegError):
            return WanpackError(f"writing {self.path} failed in the video encoder ({exc}) - check free space and "
                                "permissions, then run again")  # fmt: skip
        return exc

    def _remove_tmp(self) -> None:
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
            self._container = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def _write_error(path: Path, exc: OSError) -> WanpackError:
    return WanpackError(f"cannot write {path} ({exc.strerror or exc}) - free disk space or choose another --out")


def save_latents(path: str | os.PathLike, latents: torch.Tensor, metadata: Mapping[str, str] | None = None) -> Path:
    """Keep the final latent ([16, F_lat, H/8, W/8] or with a batch dim) as safetensors under the name 'latents'."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        save_file({"latents": latents.detach().to("cpu").contiguous()}, str(tmp), metadata=meta)
    return Path(path)


def read_video_info(path: str | os.PathLike) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of a video file, found by decoding every frame."""
    av = require_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count, height, width = 0, stream.height, stream.width
        for _frame in container.decode(stream):
            count += 1
        return count, height, width, float(stream.average_rate or 0)
