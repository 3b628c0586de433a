"""A pack as the runtime sees it: the streamable units of a component and how to cut tensors out of their bytes.

The manifest already says everything: each block's aligned byte range, its phase ranges, every tensor's absolute
offset. This module turns that into a flat list of :class:`Unit` (one aligned range each, at the chosen granularity)
and into tensor views over a byte buffer holding a unit, with keys relative to the block (``blocks.N.`` removed), as
the weight-dict contract asks. It reads nothing by itself except the small resident (non-block) tensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanpack.errors import PackFormatError
from wanpack.manifests.format import ComponentEntry, Manifest, TensorEntry, read_manifest
from wanpack.manifests.pack_files import open_pack_file, resolve_inside

TORCH_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
GRANULARITIES = ("model", "block", "phase")


@dataclass(frozen=True)
class TensorSlice:
    """Where one tensor sits inside its unit's bytes."""

    key: str  # block-relative name
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset from the unit's first byte
    length: int


@dataclass
class Unit:
    """One streamable range: a whole block, or one phase of a block. ``offset``/``length`` are 4096-aligned."""

    index: int  # position in the forward's schedule
    block: int
    phases: tuple[str, ...]  # the phases whose tensors this unit holds, in execution order
    shard: str
    offset: int
    length: int
    tensors: list[TensorSlice] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"block {self.block}" + (f" {self.phases[0]}" if len(self.phases) == 1 else "")

    def layout_key(self) -> tuple:
        """Units with equal keys have identical relative tensor layouts (so one CUDA graph serves them all)."""
        return (self.phases, self.length, tuple((t.key, t.start, t.dtype, t.shape) for t in self.tensors))


def block_relative(name: str, block: int) -> str:
    """``blocks.7.ffn.0.weight`` -> ``ffn.0.weight`` (also ``visual.transformer.7.`` for CLIP)."""
    parts = name.split(".")
    tag = str(block)
    for i, p in enumerate(parts[:-1]):
        if p == tag:
            return ".".join(parts[i + 1 :])
    raise PackFormatError(f"tensor {name} is listed in block {block} but its name has no '.{block}.' segment - "
                          "the manifest is damaged; convert again")  # fmt: skip


def tensor_view(buf: torch.Tensor, start: int, length: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A typed view of ``buf[start:start+length]`` (buf is a 1-D uint8 tensor); no copy."""
    raw = buf[start : start + length]
    if length == 0:
        return torch.empty(shape, dtype=dtype, device=buf.device)
    return raw.view(dtype).view(shape)


class PackComponent:
    """One component (dit, t5, clip) of an opened pack, split into units at a granularity."""

    def __init__(self, pack_dir: str | os.PathLike, component: str = "dit", manifest: Manifest | None = None):
        self.root = Path(pack_dir)
        self.manifest = manifest or read_manifest(self.root)
        self.entry: ComponentEntry = self.manifest.component(component)
        self.name = component

    def path(self, shard: str) -> Path:
        """Where a shard really is: symlinks resolved, refused (PackFormatError) if that leaves the pack."""
        return resolve_inside(self.root, shard)

    def check_files(self) -> None:
        """The component's extra files (tokenizer): inside the pack, regular, and of the size the manifest records
        (version-1 packs record none)."""
        for f in self.entry.files:
            os.close(open_pack_file(self.root, f.path, f.size)[0])

    @property
    def num_blocks(self) -> int:
        return self.entry.num_blocks

    def phase_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.entry.blocks[0].phases)

    def units(self, granularity: str) -> list[Unit]:
        """The forward's schedule: blocks (``model``/``block``) or phases (``phase``) in execution order."""
        if granularity not in GRANULARITIES:
            raise PackFormatError(f"unknown granularity {granularity!r} - choose one of {', '.join(GRANULARITIES)}")
        if not self.entry.blocks:
            raise PackFormatError(f"{self.root}: component {self.name} has no blocks to stream - "
                                  "load it resident instead")  # fmt: skip
        by_block: dict[int, list[TensorEntry]] = {}
        for shard in self.entry.shards:
            for t in shard.tensors:
                if t.block is not None:
                    by_block.setdefault(t.block, []).append(t)
        units: list[Unit] = []
        for b in self.entry.blocks:
            ranges = [(tuple(p.name for p in b.phases), b.offset, b.length)]
            if granularity == "phase" and b.phases:
                ranges = [((p.name,), p.offset, p.length) for p in b.phases if p.length > 0]
            for phases, off, length in ranges:
                inside = [t for t in by_block.get(b.index, []) if off <= t.offset and t.offset + t.length <= off + length]
                slices = [TensorSlice(block_relative(t.name, b.index), TORCH_DTYPES[t.dtype], tuple(t.shape),
                                      t.offset - off, t.length) for t in inside]  # fmt: skip
                units.append(Unit(len(units), b.index, phases, b.shard, off, length, slices))
        return units

    def block_bytes(self) -> int:
        return sum(b.length for b in self.entry.blocks)

    def max_unit_bytes(self, granularity: str) -> int:
        return max(u.length for u in self.units(granularity))

    def non_block_tensors(self) -> list[tuple[str, TensorEntry]]:
        """(shard path, entry) of every resident tensor, in file order (padding tensors are never listed)."""
        return [(s.path, t) for s in self.entry.shards for t in s.tensors if t.block is None]

    def non_block_bytes(self) -> int:
        return sum(t.length for _, t in self.non_block_tensors())

    def load_resident(self, device: torch.device | str = "cpu", skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Read the non-block tensors (full names) once and place them on ``device``; one positioned read each. Each
        shard is opened only inside the pack, as a regular file of its manifest size, before anything is allocated.

        ``skip`` names tensors to leave on disk (the T5's 2 GiB token table: ``read_rows`` fetches what a prompt uses).
        """
        out: dict[str, torch.Tensor] = {}
        fds: dict[str, int] = {}
        try:
            for shard, t in self.non_block_tensors():
                if t.name in skip:
                    continue
                if shard not in fds:
                    fds[shard] = open_pack_file(self.root, shard, self.entry.shard(shard).size)[0]
                buf = torch.empty(t.length, dtype=torch.uint8)
                _pread_exact(fds[shard], buf, t.offset, self.path(shard), t.name)
                out[t.name] = tensor_view(buf, 0, t.length, TORCH_DTYPES[t.dtype], tuple(t.shape)).to(device)
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows of a 2-D non-block tensor (e.g. the token table), in the order given: [len(rows), columns], on the CPU.

        A prompt uses a few hundred of the T5's 256k vocabulary rows; reading those (8 KiB each) instead of the whole
        2 GiB table is what makes the text phase cost its blocks' bytes and nothing more.
        """
        found = [(shard, t) for shard, t in self.non_block_tensors() if t.name == name]
        if not found:
            raise PackFormatError(f"{self.root}: component {self.name} has no tensor {name} - convert again")
        shard, t = found[0]
        if len(t.shape) != 2:
            raise PackFormatError(f"{self.root}: {name} is not a 2-D table - the manifest is damaged; convert again")
        n_rows, cols = t.shape
        dtype = TORCH_DTYPES[t.dtype]
        row_bytes = cols * torch.empty((), dtype=dtype).element_size()
        out = torch.empty((len(rows), row_bytes), dtype=torch.uint8)
        fd = open_pack_file(self.root, shard, self.entry.shard(shard).size)[0]
        try:
            for i, r in enumerate(rows):
                if not 0 <= r < n_rows:
                    raise PackFormatError(f"row {r} is outside {name} ({n_rows} rows) - use the pack's own tokenizer")
                _pread_exact(fd, out[i], t.offset + r * row_bytes, self.path(shard), name)
        finally:
            os.close(fd)
        return out.view(dtype).view(len(rows), cols)


def views(buf: torch.Tensor, unit: Unit) -> dict[str, torch.Tensor]:
    """Block-relative tensor views of a unit whose first byte is ``buf[0]``."""
    return {t.key: tensor_view(buf, t.start, t.length, t.dtype, t.shape) for t in unit.tensors}


class WeightViews(Mapping):
    """Read-only mapping handed to compute callbacks; refuses writes so a model cannot scribble on a slot."""

    def __init__(self, data: dict[str, torch.Tensor]):
        self._data = data

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _pread_exact(fd: int, buf: torch.Tensor, offset: int, path: Path, what: str) -> None:
    view = memoryview(buf.numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise PackFormatError(f"{path}: file ends inside {what} - the shard is truncated; convert again")
        done += n
