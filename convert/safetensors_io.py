"""Streaming safetensors reading and writing with byte-level control.

The safetensors libraries want a whole state dict in memory to write, and give no control over where a tensor lands.
The pack format needs both: tensors written one at a time (bounded memory), every phase starting on a 4096-byte
boundary, every tensor on a 64-byte boundary. The file stays a plain, valid safetensors file: the JSON header is
padded with spaces (allowed by the format) so data starts on a 4096 boundary, and gaps are filled with small U8
padding tensors (the format forbids holes in the data section).

Reading parses and checks the header ourselves (bounded size, known dtypes, contiguous in-bounds offsets) and reads
each tensor with one positioned read, so a 10 GB shard never has to be mapped into memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanpack.errors import SourceError
from wanpack.manifests.format import ALIGNMENT, DTYPE_SIZES, TENSOR_ALIGNMENT

MAX_HEADER_BYTES = 100 * 1024 * 1024
PAD_PREFIX = "__wanpack_pad_"

TORCH_TO_ST = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def st_dtype(dtype: torch.dtype) -> str:
    if dtype not in TORCH_TO_ST:
        raise SourceError(f"tensor dtype {dtype} cannot be stored in safetensors by wanpack - convert it first")
    return TORCH_TO_ST[dtype]


def round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# ------------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class StTensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset in the file
    length: int


@dataclass
class StHeader:
    """A validated safetensors header: tensors with absolute offsets, in file order."""

    path: Path
    tensors: dict[str, StTensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int

    @classmethod
    def read(cls, path: str | os.PathLike) -> StHeader:
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise SourceError(f"{path}: file is {size} bytes, too short for safetensors - it is truncated")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise SourceError(f"{path}: header length {n} is impossible for a {size}-byte file - "
                                      "the file is corrupt or truncated; download it again")  # fmt: skip
                header_bytes = f.read(n)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read ({exc.strerror}) - check the path and permissions") from None
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SourceError(f"{path}: header is not valid JSON - the file is corrupt or not safetensors") from None
        if not isinstance(header, dict):
            raise SourceError(f"{path}: header is not a JSON object - the file is corrupt or not safetensors")
        metadata = header.pop("__metadata__", {}) or {}
        data_start = 8 + n
        tensors = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SourceError(f"{path}: malformed header entry for {name!r} - the file is corrupt") from None
            if dtype not in DTYPE_SIZES:
                raise SourceError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (0 <= begin <= end):
                raise SourceError(f"{path}: tensor {name!r} has a bad shape or offsets - the file is corrupt")
            if (end - begin) != math.prod(shape) * DTYPE_SIZES[dtype]:
                raise SourceError(f"{path}: tensor {name!r} byte length does not match its shape - the file is corrupt")
            tensors[name] = StTensorInfo(name, dtype, shape, data_start + begin, end - begin)
        ordered = sorted(tensors.values(), key=lambda t: t.offset)
        pos = data_start
        for t in ordered:
            if t.offset != pos:
                raise SourceError(f"{path}: tensor {t.name!r} data does not follow the previous one - corrupt file")
            pos += t.length
        if pos > size:
            raise SourceError(f"{path}: data ends at byte {pos} but the file has {size} - the file is truncated; "
                              "download it again")  # fmt: skip
        return cls(path, {t.name: t for t in ordered}, metadata, data_start, size)


def read_tensor(fd: int, info: StTensorInfo, path: Path | str = "", buf: torch.Tensor | None = None) -> torch.Tensor:
    """One positioned read of a tensor's bytes into ``buf`` (uint8, at least as long) or fresh memory; never maps."""
    buf = torch.empty(info.length, dtype=torch.uint8) if buf is None else buf[: info.length]
    view = memoryview(buf.numpy())
    done = 0
    while done < info.length:
        n = os.preadv(fd, [view[done:]], info.offset + done)
        if n <= 0:
            raise SourceError(f"{path}: unexpected end of file reading {info.name} - the file is truncated")
        done += n
    return buf.view(ST_TO_TORCH[info.dtype]).reshape(info.shape)


# ------------------------------------------------------------------------------------------------------- writing


@dataclass
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    group: str | None = None  # tensors of one group are contiguous; each group starts on ALIGNMENT
    length: int = 0
    data_offset: int = 0  # relative to the data section
    offset: int = 0  # absolute in the file, set once the header length is known
    padding: bool = False


@dataclass
class ShardLayout:
    """Everything about a shard decided before its first byte is written."""

    header: bytes  # 8-byte length + JSON, padded so data starts on ALIGNMENT
    tensors: list[PlannedTensor]  # file order, padding included
    groups: dict[str, tuple[int, int]] = field(default_factory=dict)  # group -> absolute (offset, length)
    file_size: int = 0

    def real_tensors(self) -> list[PlannedTensor]:
        return [t for t in self.tensors if not t.padding]


def plan_shard(entries: list[PlannedTensor], metadata: dict[str, str] | None = None,
               group_align: int = ALIGNMENT, tensor_align: int = TENSOR_ALIGNMENT) -> ShardLayout:  # fmt: skip
    """Lay out tensors in order: tensors on ``tensor_align``, groups and file end on ``group_align``.

    With both set to 1 the result is an ordinary safetensors file (header padded to 8 bytes, no padding tensors),
    as the hub's files are.

    Group ranges run from the group's aligned start to the next group's start (or the aligned end of file), so
    consecutive groups tile the block with no gaps.
    """
    planned: list[PlannedTensor] = []
    pos, pad_id = 0, 0
    group_starts: list[tuple[str, int]] = []

    def pad_to(target: int) -> None:
        nonlocal pos, pad_id
        if target > pos:
            planned.append(PlannedTensor(f"{PAD_PREFIX}{pad_id}", "U8", (target - pos,), padding=True,
                                         length=target - pos, data_offset=pos))  # fmt: skip
            pad_id += 1
            pos = target

    current_group = object()
    for e in entries:
        e.length = math.prod(e.shape) * DTYPE_SIZES[e.dtype]
        if e.group != current_group:
            pad_to(round_up(pos, group_align))
            if e.group is not None:
                group_starts.append((e.group, pos))
            current_group = e.group
        pad_to(round_up(pos, tensor_align))
        e.data_offset = pos
        planned.append(e)
        pos += e.length
    pad_to(round_up(pos, group_align))

    header_dict: dict[str, object] = {"__metadata__": dict(metadata or {})}
    for t in planned:
        header_dict[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                               "data_offsets": [t.data_offset, t.data_offset + t.length]}  # fmt: skip
    body = json.dumps(header_dict, separators=(",", ":")).encode("utf-8")
    header_len = round_up(8 + len(body), max(group_align, 8)) - 8
    header = struct.pack("<Q", header_len) + body + b" " * (header_len - len(body))
    data_start = 8 + header_len
    for t in planned:
        t.offset = data_start + t.data_offset
    groups = {}
    bounds = [start for _, start in group_starts] + [pos]
    for (name, start), end in zip(group_starts, bounds[1:], strict=True):
        groups[name] = (data_start + start, end - start)
    return ShardLayout(header=header, tensors=planned, groups=groups, file_size=data_start + pos)


class ShardWriter:
    """Writes a planned shard tensor by tensor, hashing as it goes. Use as a context manager.

    Bytes go to a temporary sibling that replaces ``path`` only on a successful close(), so an interrupted write never
    leaves a half file under the real name (and a file being read through mmap is never truncated under its reader).
    """

    def __init__(self, path: str | os.PathLike, layout: ShardLayout):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.layout = layout
        self._order = iter(layout.tensors)
        self._sha = hashlib.sha256()
        self._f = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        self._put(layout.header)
        self._written = len(layout.header)

    def _put(self, data) -> None:
        self._f.write(data)
        self._sha.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; padding tensors due before it are written automatically."""
        for planned in self._order:
            if planned.padding:
                self._put(bytes(planned.length))
                continue
            if planned.name != name:
                raise RuntimeError(f"shard writer expected {planned.name}, got {name}")
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            if data.numel() != planned.length or st_dtype(tensor.dtype) != planned.dtype:
                raise RuntimeError(f"{name}: planned {planned.dtype}{list(planned.shape)}, got {tensor.dtype}"
                                   f"{list(tensor.shape)}")  # fmt: skip
            self._put(memoryview(data.numpy()))
            return
        raise RuntimeError(f"shard writer got unplanned tensor {name}")

    def close(self) -> str:
        """Write trailing padding, fsync, return the sha256 hex digest of the whole file."""
        for planned in self._order:
            if not planned.padding:
                raise RuntimeError(f"shard {self.path} closed before tensor {planned.name} was written")
            self._put(bytes(planned.length))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> str:  # fmt: skip
    """Write a whole (small) state dict as an ordinary safetensors file in the given order; returns its sha256."""
    entries = [PlannedTensor(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    layout = plan_shard(entries, metadata, group_align=1, tensor_align=1)
    with ShardWriter(path, layout) as w:
        for k, v in tensors.items():
            w.write(k, v)
        return w.close()
