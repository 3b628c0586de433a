"""The pack manifest: schema, reading with validation, writing. docs/FORMAT.md is the prose of this module.

The manifest is the single source of truth about a pack's bytes: every tensor's absolute byte offset and length in its
shard, every block's and phase's aligned byte range, and each shard's size and sha256. The converter writes it; the
runtime reads it and never guesses anything from file names. Readers validate everything they will later trust
(paths stay inside the pack, ranges stay inside files, lengths agree with dtype x shape, phases are aligned), each
rule with its own message naming the file and what to do.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from wanpack.errors import PackFormatError, UsageError

FORMAT_NAME = "wanpack"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
ALIGNMENT = 4096  # every block and phase range starts (and ends) on this boundary in its shard
TENSOR_ALIGNMENT = 64  # every tensor starts on this boundary, so byte-buffer views of any dtype are aligned
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip
QUANT_SCHEMES = ("int8", "fp8", "none")
LAYOUTS = ("by_block", "single")


@dataclass
class TensorEntry:
    """One tensor inside a shard. ``offset`` is absolute in the file (header included)."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    length: int
    block: int | None = None
    phase: str | None = None
    scale: str | None = None  # name of the per-output-channel scale tensor, for quantized weights
    quantized: bool = False


@dataclass
class RangeEntry:
    """A contiguous, ALIGNMENT-aligned byte range [offset, offset + length) of one shard."""

    name: str
    offset: int
    length: int


@dataclass
class BlockEntry:
    """Where block ``index`` of a component lives: one aligned range, split into phase ranges in execution order."""

    index: int
    shard: str
    offset: int
    length: int
    phases: list[RangeEntry] = field(default_factory=list)


@dataclass
class ShardEntry:
    """One safetensors file of the pack. ``path`` is relative to the pack directory, POSIX separators."""

    path: str
    size: int
    sha256: str
    block: int | None
    tensors: list[TensorEntry] = field(default_factory=list)


@dataclass
class QuantInfo:
    """How the component's weights were stored; the runtime's linear ops mirror exactly this."""

    scheme: str  # int8 | fp8 | none
    weight_dtype: str  # I8 | F8_E4M3 | BF16
    other_dtype: str = "BF16"  # everything that is not a quantized weight
    sensitive_dtype: str = "BF16"  # norms, modulation, embeddings, head (F32 with --keep-fp32)
    granularity: str = "per_output_channel"
    symmetric: bool = True
    qmax: float = 0.0  # 127 (int8), 448 (fp8); 0 when not quantized
    activation: str = "per_token_dynamic"


@dataclass
class ComponentEntry:
    """One network of the pack (dit, t5, clip or vae) and all its shards."""

    name: str
    arch: str
    config: dict
    quant: QuantInfo
    layout: str  # by_block | single
    num_blocks: int
    shards: list[ShardEntry] = field(default_factory=list)
    blocks: list[BlockEntry] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # extra non-tensor files (tokenizer, ...), relative paths

    def shard(self, path: str) -> ShardEntry:
        for s in self.shards:
            if s.path == path:
                return s
        raise PackFormatError(f"manifest names shard {path!r} for component {self.name} but lists no such shard")

    def tensors(self) -> dict[str, tuple[ShardEntry, TensorEntry]]:
        """Every tensor of the component by name, with the shard that holds it."""
        return {t.name: (s, t) for s in self.shards for t in s.tensors}


@dataclass
class SourceFile:
    name: str
    size: int
    sha256: str | None


@dataclass
class SourceInfo:
    kind: str  # hub | lightx2v | pth | synthetic ...
    path: str
    files: list[SourceFile] = field(default_factory=list)
    lora: list[dict] = field(default_factory=list)
    synthetic: bool = False  # random weights (wanpack synth): every run says so; absent in older manifests = False


@dataclass
class Manifest:
    format: str
    format_version: int
    created_by: str
    source: SourceInfo
    components: dict[str, ComponentEntry]

    def component(self, name: str) -> ComponentEntry:
        if name not in self.components:
            have = ", ".join(self.components) or "none"
            raise PackFormatError(f"this pack has no {name!r} component (it has: {have}) - convert it with "
                                  f"`wanpack convert --component {name}`")  # fmt: skip
        return self.components[name]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False) + "\n"


# ----------------------------------------------------------------------------------------------------- reading


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise PackFormatError(f"{where}: {what} - the pack is damaged or not a wanpack pack; convert it again")


def _safe_relpath(path: str, where: str) -> str:
    p = PurePosixPath(path)
    ok = isinstance(path, str) and path and not p.is_absolute() and ".." not in p.parts and "\\" not in path
    _check(bool(ok), where, f"path {path!r} leaves the pack directory")
    return path


def _numel(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def _validate_component(comp: ComponentEntry, where: str) -> None:
    _check(comp.layout in LAYOUTS, where, f"unknown layout {comp.layout!r}")
    _check(comp.quant.scheme in QUANT_SCHEMES, where, f"unknown quant scheme {comp.quant.scheme!r}")
    sizes = {}
    for shard in comp.shards:
        w = f"{where}/{_safe_relpath(shard.path, where)}"
        _check(shard.size >= 8, w, "shard size is too small for a safetensors file")
        sizes[shard.path] = shard.size
        for t in shard.tensors:
            _check(t.dtype in DTYPE_SIZES, w, f"tensor {t.name} has unknown dtype {t.dtype!r}")
            _check(all(isinstance(d, int) and d >= 0 for d in t.shape), w, f"tensor {t.name} has a bad shape")
            _check(t.length == _numel(t.shape) * DTYPE_SIZES[t.dtype], w, f"tensor {t.name} length != dtype x shape")
            _check(t.offset >= 0 and t.offset + t.length <= shard.size, w, f"tensor {t.name} lies outside the file")
            _check(t.offset % TENSOR_ALIGNMENT == 0, w, f"tensor {t.name} is not {TENSOR_ALIGNMENT}-byte aligned")
    names = [t.name for s in comp.shards for t in s.tensors]
    _check(len(names) == len(set(names)), where, "a tensor name appears twice")
    by_name = {t.name: t for s in comp.shards for t in s.tensors}
    for t in by_name.values():
        if t.scale is not None:
            _check(t.scale in by_name, where, f"tensor {t.name} names missing scale {t.scale}")
    _check([b.index for b in comp.blocks] == list(range(comp.num_blocks)), where, "blocks are not numbered 0..N-1")
    for b in comp.blocks:
        w = f"{where}/block {b.index}"
        _check(b.shard in sizes, w, f"names unknown shard {b.shard!r}")
        _check(b.offset % ALIGNMENT == 0 and b.length % ALIGNMENT == 0, w, "range is not 4096-aligned")
        _check(b.offset + b.length <= _round_up(sizes[b.shard], ALIGNMENT), w, "range lies outside its shard")
        pos = b.offset
        for ph in b.phases:
            _check(ph.offset == pos and ph.length % ALIGNMENT == 0, w, f"phase {ph.name} is not aligned or not contiguous")
            pos += ph.length
        _check(pos == b.offset + b.length, w, "phases do not cover the block range")
        for t in comp.shard(b.shard).tensors:
            if t.block == b.index:
                _check(b.offset <= t.offset and t.offset + t.length <= b.offset + b.length, w,
                       f"tensor {t.name} lies outside its block range")  # fmt: skip


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def manifest_from_dict(data: dict, where: str = MANIFEST_NAME) -> Manifest:
    """Build and validate a Manifest from parsed JSON; raises PackFormatError naming the rule that failed."""
    _check(isinstance(data, dict), where, "manifest is not a JSON object")
    _check(data.get("format") == FORMAT_NAME, where, f"format is {data.get('format')!r}, not {FORMAT_NAME!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise PackFormatError(f"{where}: pack format version {version!r} is not supported by this wanpack "
                              f"(reads version {FORMAT_VERSION}) - convert the checkpoint again or upgrade wanpack")  # fmt: skip
    try:
        src = data["source"]
        source = SourceInfo(kind=src["kind"], path=src["path"], files=[SourceFile(**f) for f in src.get("files", [])],
                            lora=list(src.get("lora", [])), synthetic=src.get("synthetic", False))  # fmt: skip
        _check(isinstance(source.synthetic, bool), where, "source.synthetic is not true or false")
        components = {}
        for name, c in data["components"].items():
            shards = [ShardEntry(path=s["path"], size=s["size"], sha256=s["sha256"], block=s["block"],
                                 tensors=[TensorEntry(**t) for t in s["tensors"]]) for s in c["shards"]]  # fmt: skip
            blocks = [BlockEntry(index=b["index"], shard=b["shard"], offset=b["offset"], length=b["length"],
                                 phases=[RangeEntry(**p) for p in b["phases"]]) for b in c["blocks"]]  # fmt: skip
            comp = ComponentEntry(name=c["name"], arch=c["arch"], config=c["config"], quant=QuantInfo(**c["quant"]),
                                  layout=c["layout"], num_blocks=c["num_blocks"], shards=shards, blocks=blocks,
                                  files=[_safe_relpath(f, where) for f in c.get("files", [])])  # fmt: skip
            _check(comp.name == name, where, f"component key {name!r} != its name {comp.name!r}")
            _validate_component(comp, f"{where} [{name}]")
            components[name] = comp
        manifest = Manifest(format=data["format"], format_version=version, created_by=data.get("created_by", ""),
                            source=source, components=components)  # fmt: skip
    except (KeyError, TypeError, AttributeError) as exc:
        raise PackFormatError(f"{where}: missing or malformed field ({exc}) - the pack is damaged; convert it again") from None
    return manifest


def read_manifest(pack_dir: str | os.PathLike) -> Manifest:
    """Read and validate ``PACK_DIR/manifest.json``."""
    path = Path(pack_dir) / MANIFEST_NAME
    if not Path(pack_dir).is_dir():  # a path the user mistyped: a usage error (exit 2), not a damaged pack
        what = "not a directory" if Path(pack_dir).exists() else "no such folder"
        raise UsageError(f"{pack_dir}: {what} - pass the folder that `wanpack convert --out` created")
    if not path.is_file():
        raise PackFormatError(f"{path}: no manifest - this folder is not a finished wanpack pack; convert again")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackFormatError(f"{path}: manifest is larger than {MAX_MANIFEST_BYTES} bytes - refusing to read it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackFormatError(f"{path}: manifest is not valid JSON ({exc}) - the pack is damaged; convert again") from None
    return manifest_from_dict(data, where=str(path))


def write_manifest(pack_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write manifest.json (validating first, so we never write one we would refuse to read) and fsync it."""
    manifest_from_dict(json.loads(manifest.to_json()), where="manifest being written")
    path = Path(pack_dir) / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    return path
