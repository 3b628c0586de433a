"""Source checkpoints: where each tensor of a component comes from, read one tensor at a time.

Three kinds of source are understood, told apart by the files they contain (never by folder names):
- a hub folder: ``diffusion_pytorch_model.safetensors`` or its ``-0000i-of-0000K`` shards + index json, with
  config.json, and the encoders as ``.pth`` state dicts beside it;
- a LightX2V folder: ``block_N.safetensors`` + ``non_block.safetensors``, possibly already quantized
  (``<key>_scale`` tensors next to int8/fp8 weights);
- a single safetensors file (e.g. a distilled model), possibly with a ``model.diffusion_model.`` style key prefix.

Safetensors sources are read with positioned reads in file order, so each file is read exactly once, front to back,
and its sha256 is computed on the way at no extra I/O. ``.pth`` files are opened with
``torch.load(mmap=True, weights_only=True)``: nothing but tensors is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanpack.convert.safetensors_io import ST_TO_TORCH, StHeader, StTensorInfo, read_tensor, st_dtype
from wanpack.errors import SourceError

DIT_SINGLE = "diffusion_pytorch_model.safetensors"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_BLOCK_FILE = re.compile(r"^block_(\d+)\.safetensors$")
_POOL_MIN_BYTES = 1 << 20


class BufferPool:
    """Reuses large read buffers across tensors.

    A fresh allocation of a few hundred MB is returned to the OS on free and page-faults (and zero-fills) every 4 KiB
    again on the next read; a converter reading 60 GB spent more time in those faults than in copying. A buffer goes
    back to the free list when every holder (the consumer, the source hasher) has released the tensor cut from it.
    """

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, list] = {}  # data_ptr -> [buffer, holders]
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        if nbytes < _POOL_MIN_BYTES:
            return torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.numel() <= 2 * nbytes]
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._lent[buf.data_ptr()] = [buf, 1]
        return buf

    def retain(self, tensor: torch.Tensor) -> None:
        """One more holder of the buffer under ``tensor`` (a no-op for tensors the pool did not lend)."""
        with self._lock:
            entry = self._lent.get(tensor.untyped_storage().data_ptr())
            if entry is not None:
                entry[1] += 1

    def release(self, tensor: torch.Tensor) -> None:
        """One holder fewer; the last one gives the buffer back."""
        with self._lock:
            key = tensor.untyped_storage().data_ptr()
            entry = self._lent.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._lent[key]
                self._free.append(entry[0])
                if len(self._free) > self.keep:
                    self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))


class _BackgroundHash:
    """sha256 of one file fed in order on its own thread, so reading never waits for hashing (and vice versa).

    At most ``depth`` pieces wait, which bounds the memory they pin; pieces are released to the pool once hashed.
    """

    def __init__(self, pool: BufferPool | None, depth: int = 2):
        self.sha = hashlib.sha256()
        self.pool = pool
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.cancelled = False
        self.thread = threading.Thread(target=self._work, name="wanpack-source-hash", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (item := self.q.get()) is not None:
            try:
                if self.error is None and not self.cancelled:
                    self.sha.update(item if isinstance(item, bytes) else memoryview(item.reshape(-1).view(torch.uint8).numpy()))
            except BaseException as exc:  # handed to the reader at finish()
                self.error = exc
            finally:
                if self.pool is not None and isinstance(item, torch.Tensor):
                    self.pool.release(item)

    def feed(self, data: bytes | torch.Tensor) -> None:
        if self.pool is not None and isinstance(data, torch.Tensor):
            self.pool.retain(data)
        self.q.put(data)

    def finish(self) -> str:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.sha.hexdigest()

    def abandon(self) -> None:
        """Stop without a result (the conversion was interrupted); returns once the thread has ended."""
        self.cancelled = True
        self.q.put(None)
        self.thread.join()


@dataclass(frozen=True)
class SourceTensor:
    """Metadata of one source tensor (no data)."""

    name: str  # key after prefix stripping
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class SafetensorsSource:
    """A set of safetensors files that together hold one component's tensors."""

    kind: str
    root: Path
    headers: list[StHeader]
    prefix: str = ""
    config: dict = field(default_factory=dict)

    @property
    def tensors(self) -> dict[str, SourceTensor]:
        out = {}
        for h in self.headers:
            for raw, info in h.tensors.items():
                name = raw[len(self.prefix) :]
                out[name] = SourceTensor(name, ST_TO_TORCH[info.dtype], info.shape, info.length)
        return out

    @property
    def files(self) -> list[Path]:
        return [h.path for h in self.headers]

    def read_in_file_order(self, wanted: set[str], hashes: dict[str, str] | None,
                           on_bytes: Callable[[int], None] = lambda n: None,
                           pool: BufferPool | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
        """Yield (name, tensor) for wanted tensors, reading every file once front to back.

        When ``hashes`` is a dict, every byte of every file is read (unwanted tensors too) and the file's sha256 is
        stored under its name, so the manifest can describe the source exactly.
        """
        for h in self.headers:
            known = hub_cache_sha256(h.path) if hashes is not None else None
            if known is not None:
                hashes[h.path.name] = known
            sha = _BackgroundHash(pool) if hashes is not None and known is None else None
            fd = os.open(h.path, os.O_RDONLY)
            try:
                if sha is not None:
                    sha.feed(os.pread(fd, h.data_start, 0))
                infos = list(h.tensors.items())  # already in offset order
                for i, (raw, info) in enumerate(infos):
                    name = raw[len(self.prefix) :]
                    if name not in wanted and sha is None:
                        continue
                    if i + 1 < len(infos):  # let the disk fetch the next tensor while we hash and quantize this one
                        _prefetch(fd, infos[i + 1][1])
                    tensor = read_tensor(fd, info, h.path, pool.get(info.length) if pool else None)
                    if sha is not None:
                        sha.feed(tensor)
                    on_bytes(info.length)
                    _drop_cache(fd, info)
                    if name in wanted:
                        yield name, tensor
                    elif pool is not None:
                        pool.release(tensor)
                if sha is not None:
                    end = max((t.offset + t.length for t in h.tensors.values()), default=h.data_start)
                    if end < h.file_size:
                        sha.feed(os.pread(fd, h.file_size - end, end))
                    hashes[h.path.name] = sha.finish()
                    sha = None
            finally:
                if sha is not None:
                    sha.abandon()
                os.close(fd)


def hub_cache_sha256(path: Path) -> str | None:
    """The sha256 of a file in the Hugging Face cache, read off its blob name; None elsewhere.

    The hub cache stores an LFS file as ``blobs/<sha256>`` behind the snapshot's symlink, and `wanpack download`
    checked that digest before the file became visible, so hashing 60 GB again would add nothing but minutes.
    """
    if not path.is_symlink():
        return None
    target = path.resolve()
    name = target.name
    if target.parent.name == "blobs" and len(name) == 64 and all(c in "0123456789abcdef" for c in name):
        return name
    return None


def _prefetch(fd: int, info: StTensorInfo) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, info.offset, info.length, os.POSIX_FADV_WILLNEED)


def _drop_cache(fd: int, info: StTensorInfo) -> None:
    """Tell the kernel we will not read these bytes again, so a 60 GB conversion does not flush the page cache."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, info.offset, info.length, os.POSIX_FADV_DONTNEED)


def _common_prefix(headers: list[StHeader]) -> str:
    names = [n for h in headers for n in h.tensors]
    for prefix in KEY_PREFIXES:
        if names and all(n.startswith(prefix) for n in names):
            return prefix
    return ""


def open_safetensors_source(path: str | os.PathLike) -> SafetensorsSource:
    """Open a hub folder, a LightX2V block folder, or a single .safetensors file as a DiT source."""
    path = Path(path)
    if path.is_file():
        headers, kind, root = [StHeader.read(path)], "safetensors-file", path.parent
    elif not path.is_dir():
        raise SourceError(f"{path}: no such file or folder - pass a downloaded checkpoint folder or .safetensors file")
    elif (path / DIT_INDEX).is_file():
        headers, kind, root = _read_index(path), "hub", path
    elif (path / DIT_SINGLE).is_file():
        headers, kind, root = [StHeader.read(path / DIT_SINGLE)], "hub", path
    elif (path / "non_block.safetensors").is_file():
        blocks = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _BLOCK_FILE.match(p.name)))
        files = [p for _, p in blocks] + [path / "non_block.safetensors"]
        headers, kind, root = [StHeader.read(f) for f in files], "lightx2v", path
    else:
        raise SourceError(f"{path}: no DiT weights found (expected {DIT_SINGLE}, its shards + {DIT_INDEX}, or "
                          "block_N.safetensors + non_block.safetensors) - point at the model folder")  # fmt: skip
    config = {}
    if (root / "config.json").is_file():
        try:
            config = json.loads((root / "config.json").read_text())
        except json.JSONDecodeError:
            raise SourceError(f"{root / 'config.json'}: not valid JSON - download it again") from None
    seen: dict[str, Path] = {}
    for h in headers:
        for name in h.tensors:
            if name in seen:
                raise SourceError(f"{h.path}: tensor {name} also appears in {seen[name]} - the source is inconsistent")
            seen[name] = h.path
    return SafetensorsSource(kind, root, headers, _common_prefix(headers), config)


def _read_index(root: Path) -> list[StHeader]:
    try:
        index = json.loads((root / DIT_INDEX).read_text())
        weight_map: dict[str, str] = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SourceError(f"{root / DIT_INDEX}: not a valid index (needs a weight_map) - download it again") from None
    files = sorted(set(weight_map.values()))
    for f in files:
        if "/" in f or "\\" in f or f.startswith("."):
            raise SourceError(f"{root / DIT_INDEX}: shard name {f!r} leaves the folder - the index is not trustworthy")
        if not (root / f).is_file():
            raise SourceError(f"{root / f}: shard listed in the index is missing - download it again")
    headers = [StHeader.read(root / f) for f in files]
    for h in headers:
        for name in h.tensors:
            if weight_map.get(name) != h.path.name:
                raise SourceError(f"{h.path}: holds {name} but the index maps it to {weight_map.get(name)!r} - "
                                  "the index and shards disagree; download again")  # fmt: skip
    listed = {n for h in headers for n in h.tensors}
    missing = sorted(set(weight_map) - listed)
    if missing:
        raise SourceError(f"{root / DIT_INDEX}: lists {missing[0]} (and {len(missing) - 1} more) that no shard holds")
    return headers


@dataclass
class PthSource:
    """A torch state-dict ``.pth`` (T5, CLIP, VAE), loaded lazily via mmap, tensors only."""

    path: Path
    state: dict[str, torch.Tensor]
    kind: str = "pth"

    @property
    def tensors(self) -> dict[str, SourceTensor]:
        return {k: SourceTensor(k, v.dtype, tuple(v.shape), v.numel() * v.element_size()) for k, v in self.state.items()}

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def read_in_file_order(self, wanted: set[str], hashes: dict[str, str] | None,
                           on_bytes: Callable[[int], None] = lambda n: None,
                           pool: BufferPool | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
        if hashes is not None:
            hashes[self.path.name] = sha256_file(self.path)
        for name, tensor in self.state.items():
            if name in wanted:
                on_bytes(tensor.numel() * tensor.element_size())
                yield name, tensor


def open_pth_source(path: str | os.PathLike) -> PthSource:
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: file not found - download the component or pass its path")
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported object"
        raise SourceError(f"{path}: holds objects that would need arbitrary unpickling ({first[:120]}) - refusing; "
                          "export a plain state dict of tensors") from None  # fmt: skip
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise SourceError(f"{path}: not a readable torch checkpoint ({str(exc).splitlines()[0][:120]}) - "
                          "download it again") from None  # fmt: skip
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{path}: is not a state dict of tensors - export a plain state dict")
    for v in state.values():
        st_dtype(v.dtype)
    return PthSource(path, state)


def sha256_file(path: Path | int, chunk: int = 16 << 20) -> str:
    """sha256 of a file's bytes; ``path`` may be an open fd, which is read from its position and closed."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()
