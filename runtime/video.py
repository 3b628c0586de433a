"""Video and latent output: H.264 mp4 through PyAV, written atomically so an existing file is never left corrupt.

Every writer goes to a temporary file in the destination folder and renames it over the target only once the file
is complete; a failure (or Ctrl-C) leaves the old file, if any, untouched. ``check_outputs``, ``check_output_path`` and
``require_av`` let the pipeline fail on a path that would lose data, an unwritable path or a missing PyAV before any
heavy work starts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from wanpack.errors import UsageError, WanpackError

DEFAULT_FPS = 16
DEFAULT_CRF = 18  # x264 constant-quality level: visually near-lossless for generated video, ~4x smaller than crf 0
VIDEO_SUFFIX = ".mp4"  # the one container write_video produces


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
    av = require_av()
    count, height, width, it = _frame_iter(frames)
    if count < 1 or height % 2 or width % 2:
        raise UsageError(f"cannot encode {count} frames of {width}x{height} - H.264 needs even sizes and >= 1 frame")
    with atomic_path(path) as tmp:
        container = av.open(str(tmp), mode="w", format="mp4")
        try:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for rgb in it:
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()
    return Path(path)


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
