"""The pack manifest: schema, reading with validation, writing. docs/FORMAT.md is the prose of this module.

The manifest is the single source of truth about a pack's bytes: every tensor's absolute byte offset and length in its
shard, every block's and phase's aligned byte range, and each shard's size and sha256. The converter writes it; the
runtime reads it and never guesses anything from file names. Readers validate everything they will later trust
(paths stay inside the pack, ranges stay inside files, lengths agree with dtype x shape, phases are aligned), each
rule with its own message naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from wanpack.errors import PackFormatError, UsageError
from wanpack.manifests.arch import component_tensors, config_from_dict
from wanpack.manifests.pack_files import open_pack_file

FORMAT_NAME = "wanpack"
FORMAT_VERSION = 2  # written; version 1 (files[] as bare paths, no hashes) is still read
READABLE_VERSIONS = (1, 2)
COMPONENT_NAMES = ("dit", "t5", "clip", "vae")
SCALE_SUFFIX = "_scale"  # a quantized weight's per-output-channel scale is stored as <weight name>_scale
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
class PackFile:
    """A non-tensor file of a component (the tokenizer's). ``size``/``sha256`` are None only in version-1 packs."""

    path: str
    size: int | None = None
    sha256: str | None = None


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
    files: list[PackFile] = field(default_factory=list)  # extra non-tensor files (tokenizer, ...)

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
# Nothing in a manifest is trusted (docs/FORMAT.md, threat model): every field is checked for type and range before
# the dataclasses are built, every relation the runtime relies on is checked after, and every failure, however
# malformed the input, is one PackFormatError line.

MAX_INT = 1 << 53  # sizes, offsets and lengths: JSON-safe integers (8 PiB)
MAX_NDIM = 8
MAX_BLOCKS = 4096
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")  # a sha256 as manifests and the Hub write it
FLOAT_DTYPES = ("F16", "BF16", "F32")  # what an unquantized tensor may be stored as
QUANT_DTYPES = {"int8": ("I8",), "fp8": ("F8_E4M3",), "none": FLOAT_DTYPES}


def _damaged(where: str, what: str) -> PackFormatError:
    text = f"{where}: {what}".replace("\r", "\\r").replace("\n", "\\n")  # names from the file stay on one line
    return PackFormatError(f"{text} - the pack is damaged or not a wanpack pack; convert it again")


def _check(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise _damaged(where, what)


def _present(v: object, where: str, what: str) -> None:
    _check(v is not None, where, f"{what} is missing")


def _obj(v: object, where: str, what: str) -> dict:
    _present(v, where, what)
    _check(isinstance(v, dict), where, f"{what} is not an object")
    return v  # type: ignore[return-value]


def _list(v: object, where: str, what: str) -> list:
    _present(v, where, what)
    _check(isinstance(v, list), where, f"{what} is not a list")
    return v  # type: ignore[return-value]


def _str(v: object, where: str, what: str, optional: bool = False) -> str:
    if optional and v is None:
        return v  # type: ignore[return-value]
    _present(v, where, what)
    _check(isinstance(v, str) and len(v) <= 4096, where, f"{what} is not a string")
    return v  # type: ignore[return-value]


def _int(v: object, where: str, what: str, optional: bool = False, hi: int = MAX_INT) -> int:
    if optional and v is None:
        return v  # type: ignore[return-value]
    _present(v, where, what)
    ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi
    _check(ok, where, f"{what} is not an integer in [0, {hi}]")
    return v  # type: ignore[return-value]


def _bool(v: object, where: str, what: str) -> bool:
    _present(v, where, what)
    _check(isinstance(v, bool), where, f"{what} is not true or false")
    return v  # type: ignore[return-value]


def _sha256(v: object, where: str, what: str, optional: bool = False) -> str | None:
    if optional and v is None:
        return None
    _present(v, where, what)
    _check(isinstance(v, str) and bool(SHA256_HEX.match(v)), where, f"{what} is not 64 lowercase hex characters")
    return v  # type: ignore[return-value]


def _safe_relpath(path: object, where: str) -> str:
    ok = isinstance(path, str) and 0 < len(path) <= 4096 and all(c >= " " for c in path)
    _check(ok, where, f"path {str(path)[:80]!r} is not a relative path")
    p = PurePosixPath(path)  # type: ignore[arg-type]
    ok = not p.is_absolute() and ".." not in p.parts and "\\" not in path  # type: ignore[operator]
    _check(ok, where, f"path {path!r} leaves the pack directory")
    return path  # type: ignore[return-value]


def _numel(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _tensor(d: object, w: str) -> TensorEntry:
    d = _obj(d, w, "a tensor entry")
    name = _str(d.get("name"), w, "a tensor name")
    w = f"{w} tensor {name[:120]}"
    shape = _list(d.get("shape"), w, "shape")
    _check(len(shape) <= MAX_NDIM, w, f"shape has more than {MAX_NDIM} dimensions")
    return TensorEntry(name=name, dtype=_str(d.get("dtype"), w, "dtype"),
                       shape=[_int(x, w, "a dimension") for x in shape], offset=_int(d.get("offset"), w, "offset"),
                       length=_int(d.get("length"), w, "length"),
                       block=_int(d.get("block"), w, "block", optional=True),
                       phase=_str(d.get("phase"), w, "phase", optional=True),
                       scale=_str(d.get("scale"), w, "scale", optional=True),
                       quantized=_bool(d.get("quantized", False), w, "quantized"))  # fmt: skip


def _shard(d: object, w: str) -> ShardEntry:
    d = _obj(d, w, "a shard entry")
    path = _safe_relpath(d.get("path"), w)
    w = f"{w}/{path}"
    return ShardEntry(path=path, size=_int(d.get("size"), w, "size"), sha256=_sha256(d.get("sha256"), w, "sha256"),
                      block=_int(d.get("block"), w, "block", optional=True),
                      tensors=[_tensor(t, w) for t in _list(d.get("tensors"), w, "tensors")])  # fmt: skip


def _range(d: object, w: str) -> RangeEntry:
    d = _obj(d, w, "a phase range")
    return RangeEntry(name=_str(d.get("name"), w, "a phase name"), offset=_int(d.get("offset"), w, "phase offset"),
                      length=_int(d.get("length"), w, "phase length"))  # fmt: skip


def _block(d: object, w: str) -> BlockEntry:
    d = _obj(d, w, "a block entry")
    return BlockEntry(index=_int(d.get("index"), w, "block index"), shard=_str(d.get("shard"), w, "block shard"),
                      offset=_int(d.get("offset"), w, "block offset"), length=_int(d.get("length"), w, "block length"),
                      phases=[_range(p, w) for p in _list(d.get("phases"), w, "phases")])  # fmt: skip


def _quant(d: object, w: str) -> QuantInfo:
    d = _obj(d, w, "quant")
    qmax = d.get("qmax", 0.0)
    _check(isinstance(qmax, int | float) and not isinstance(qmax, bool) and math.isfinite(qmax) and qmax >= 0, w,
           "quant.qmax is not a finite number")  # fmt: skip
    text = {k: _str(d[k], w, f"quant.{k}") for k in ("other_dtype", "sensitive_dtype", "granularity", "activation")
            if k in d}  # fmt: skip
    return QuantInfo(scheme=_str(d.get("scheme"), w, "quant.scheme"), weight_dtype=_str(d.get("weight_dtype"), w,
                     "quant.weight_dtype"), symmetric=_bool(d.get("symmetric", True), w, "quant.symmetric"),
                     qmax=float(qmax), **text)  # fmt: skip


def _pack_file(d: object, w: str, version: int) -> PackFile:
    if version == 1:  # version 1 listed bare paths, with no size or hash
        return PackFile(path=_safe_relpath(d, w))
    d = _obj(d, w, "a files[] entry")
    path = _safe_relpath(d.get("path"), w)
    return PackFile(path=path, size=_int(d.get("size"), f"{w}/{path}", "size"),
                    sha256=_sha256(d.get("sha256"), f"{w}/{path}", "sha256"))  # fmt: skip


def _component(name: str, c: object, w: str, version: int) -> ComponentEntry:
    c = _obj(c, w, "component")
    _check(isinstance(c.get("config"), dict), w, "config is not an object")
    return ComponentEntry(name=_str(c.get("name"), w, "name"), arch=_str(c.get("arch"), w, "arch"), config=c["config"],
                          quant=_quant(c.get("quant"), w), layout=_str(c.get("layout"), w, "layout"),
                          num_blocks=_int(c.get("num_blocks"), w, "num_blocks", hi=MAX_BLOCKS),
                          shards=[_shard(s, w) for s in _list(c.get("shards"), w, "shards")],
                          blocks=[_block(b, w) for b in _list(c.get("blocks"), w, "blocks")],
                          files=[_pack_file(f, w, version) for f in _list(c.get("files", []), w, "files")])  # fmt: skip


def _source(d: object, w: str) -> SourceInfo:
    d = _obj(d, w, "source")
    files = []
    for f in _list(d.get("files", []), w, "source.files"):
        f = _obj(f, w, "a source.files entry")
        files.append(SourceFile(name=_str(f.get("name"), w, "source file name"),
                                size=_int(f.get("size"), w, "source file size"),
                                sha256=_sha256(f.get("sha256"), w, "source file sha256", optional=True)))
    lora = [_obj(x, w, "a source.lora entry") for x in _list(d.get("lora", []), w, "source.lora")]
    synthetic = _bool(d.get("synthetic", False), w, "source.synthetic")  # absent (older packs): not random
    return SourceInfo(kind=_str(d.get("kind"), w, "source.kind"), path=_str(d.get("path"), w, "source.path"),
                      files=files, lora=lora, synthetic=synthetic)  # fmt: skip



def _validate_component(comp: ComponentEntry, where: str) -> None:
    """The relations between a component's fields that the runtime relies on (each dataclass is already typed)."""
    _check(comp.layout in LAYOUTS, where, f"unknown layout {comp.layout!r}")
    _check(comp.quant.scheme in QUANT_SCHEMES, where, f"unknown quant scheme {comp.quant.scheme!r}")
    _check(comp.quant.weight_dtype in QUANT_DTYPES[comp.quant.scheme], where,
           f"quant.weight_dtype {comp.quant.weight_dtype!r} does not fit scheme {comp.quant.scheme}")  # fmt: skip
    names = [t.name for s in comp.shards for t in s.tensors]
    _check(len(names) == len(set(names)), where, "a tensor name appears twice")
    sizes: dict[str, int] = {}
    for shard in comp.shards:
        w = f"{where}/{shard.path}"
        _check(shard.path not in sizes, where, f"shard {shard.path} is listed twice")
        _check(shard.size >= 8, w, "shard size is too small for a safetensors file")
        sizes[shard.path] = shard.size
        for t in shard.tensors:
            _check(t.dtype in DTYPE_SIZES, w, f"tensor {t.name} has unknown dtype {t.dtype!r}")
            _check(t.length == _numel(t.shape) * DTYPE_SIZES[t.dtype], w, f"tensor {t.name} length != dtype x shape")
            _check(t.offset >= 8 and t.offset + t.length <= shard.size, w, f"tensor {t.name} lies outside the file")
            _check(t.offset % TENSOR_ALIGNMENT == 0, w, f"tensor {t.name} is not {TENSOR_ALIGNMENT}-byte aligned")
        _check_disjoint([(t.offset, t.length, t.name) for t in shard.tensors], w, "tensor")
    by_name = {t.name: (s, t) for s in comp.shards for t in s.tensors}
    for _, t in by_name.values():
        if t.scale is not None:
            _check(t.scale in by_name, where, f"tensor {t.name} names missing scale {t.scale}")
    _check([b.index for b in comp.blocks] == list(range(comp.num_blocks)), where, "blocks are not numbered 0..N-1")
    for shard_path in sizes:
        ranges = [(b.offset, b.length, f"block {b.index}") for b in comp.blocks if b.shard == shard_path]
        _check_disjoint(ranges, f"{where}/{shard_path}", "block")
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
    for shard, t in by_name.values():
        if t.block is None:
            continue
        w = f"{where}/{shard.path}"
        _check(t.block < comp.num_blocks, w, f"tensor {t.name} names block {t.block}, which does not exist")
        b = comp.blocks[t.block]
        _check(b.shard == shard.path, w, f"tensor {t.name} is not in the shard of block {t.block}")
        _check(b.offset <= t.offset and t.offset + t.length <= b.offset + b.length, w,
               f"tensor {t.name} lies outside its block range")  # fmt: skip
        phase = next((p for p in b.phases if p.name == t.phase), None)
        _check(phase is not None and phase.offset <= t.offset and t.offset + t.length <= phase.offset + phase.length,
               w, f"tensor {t.name} lies outside its phase {t.phase!r}")  # fmt: skip
    files = [f.path for f in comp.files]
    _check(len(files) == len(set(files)), where, "a file is listed twice")


def _check_disjoint(ranges: list[tuple[int, int, str]], where: str, what: str) -> None:
    end, last = 0, ""
    for offset, length, name in sorted(ranges):
        _check(offset >= end, where, f"{what} {name} overlaps {last}")
        if length:
            end, last = offset + length, name


def _check_architecture(comp: ComponentEntry, where: str) -> None:
    """The config is sane (types, ranges, divisibility) and the tensors are exactly the ones it implies: every key
    of the architecture with its shape, block and phase, quantized weights with their scales, nothing else. So the
    runtime never meets a shape or dtype its kernels do not expect, and every size derived from the config is backed
    by bytes in the files."""
    try:
        cfg = config_from_dict(comp.config)
    except UsageError as exc:
        raise _damaged(where, f"bad config ({exc})") from None
    _check(cfg.kind == comp.name, where, f"config is a {cfg.kind} config, not {comp.name}")
    specs = component_tensors(cfg)
    have = {t.name: t for s in comp.shards for t in s.tensors}
    quantized = comp.quant.scheme != "none"
    expected = {s.name for s in specs} | {s.name + SCALE_SUFFIX for s in specs if s.quantize and quantized}
    extra, missing = sorted(set(have) - expected), sorted(expected - set(have))
    _check(not extra, where, f"tensor {extra[0][:120] if extra else ''} is not part of {cfg.name}")
    _check(not missing, where, f"tensor {missing[0] if missing else ''} of {cfg.name} is missing")
    blocks = {s.block for s in specs if s.block is not None}
    _check(comp.num_blocks == len(blocks), where, f"num_blocks is {comp.num_blocks}, {cfg.name} has {len(blocks)}")
    phases = tuple(cfg.phases)
    for b in comp.blocks:
        names = [p.name for p in b.phases]
        _check(names == [p for p in phases if p in names], where, f"block {b.index} phases {names} are not {phases}")
    for s in specs:
        t = have[s.name]
        w = f"{where} tensor {s.name}"
        _check((tuple(t.shape), t.block, t.phase) == (s.shape, s.block, s.phase), w,
               f"shape/block/phase {t.shape}/{t.block}/{t.phase} != {list(s.shape)}/{s.block}/{s.phase} of {cfg.name}")
        if s.quantize and quantized:
            scale = have[s.name + SCALE_SUFFIX]
            _check(t.quantized and t.scale == scale.name and t.dtype == comp.quant.weight_dtype, w,
                   f"must be a {comp.quant.weight_dtype} weight with its scale")  # fmt: skip
            _check((scale.dtype, tuple(scale.shape), scale.block, scale.phase) == ("F32", (s.shape[0], 1), s.block,
                   s.phase), w, "scale must be F32 [out, 1] beside its weight")  # fmt: skip
        else:
            _check(not t.quantized and t.scale is None and t.dtype in FLOAT_DTYPES, w,
                   f"must be an unquantized {'/'.join(FLOAT_DTYPES)} tensor")  # fmt: skip


def manifest_from_dict(data: dict, where: str = MANIFEST_NAME) -> Manifest:
    """Build and validate a Manifest from parsed JSON; raises PackFormatError naming the rule that failed."""
    _check(isinstance(data, dict), where, "manifest is not a JSON object")
    _check(data.get("format") == FORMAT_NAME, where, f"format is {str(data.get('format'))[:40]!r}, not {FORMAT_NAME!r}")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        shown = version if isinstance(version, int) else str(version)[:20]
        raise PackFormatError(f"{where}: pack format version {shown!r} is not supported by this wanpack "
                              f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}) - convert the checkpoint "
                              "again or upgrade wanpack")  # fmt: skip
    try:
        source = _source(data.get("source"), where)
        components = {}
        for name, c in _obj(data.get("components"), where, "components").items():
            w = f"{where} [{name[:40]}]"
            comp = _component(name, c, w, version)
            _check(comp.name == name, where, f"component key {name[:40]!r} != its name {comp.name[:40]!r}")
            _check(name in COMPONENT_NAMES, where, f"unknown component {name[:40]!r}")
            _validate_component(comp, w)
            _check_architecture(comp, w)
            components[name] = comp
        manifest = Manifest(format=FORMAT_NAME, format_version=version,
                            created_by=_str(data.get("created_by", ""), where, "created_by"), source=source,
                            components=components)  # fmt: skip
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError, RecursionError) as exc:
        raise PackFormatError(f"{where}: malformed manifest ({type(exc).__name__}: {str(exc)[:100]}) - the pack is "
                              "damaged; convert it again") from None  # fmt: skip
    return manifest


def read_manifest_with_digest(pack_dir: str | os.PathLike) -> tuple[Manifest, str]:
    """Read and validate ``PACK_DIR/manifest.json``; also return the sha256 of the exact bytes parsed."""
    if not Path(pack_dir).is_dir():  # a path the user mistyped: a usage error (exit 2), not a damaged pack
        what = "not a directory" if Path(pack_dir).exists() else "no such folder"
        raise UsageError(f"{pack_dir}: {what} - pass the folder that `wanpack convert --out` created")
    path = Path(pack_dir) / MANIFEST_NAME
    if not os.path.lexists(path):
        raise PackFormatError(f"{path}: no manifest - this folder is not a finished wanpack pack; convert again")
    fd, _ = open_pack_file(pack_dir, MANIFEST_NAME)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise PackFormatError(f"{path}: manifest is larger than {MAX_MANIFEST_BYTES} bytes - refusing to read it")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:100]
        raise PackFormatError(f"{path}: manifest is not valid JSON ({why}) - the pack is damaged; "
                              "convert it again") from None
    return manifest_from_dict(data, where=str(path)), hashlib.sha256(raw).hexdigest()


def read_manifest(pack_dir: str | os.PathLike) -> Manifest:
    """Read and validate ``PACK_DIR/manifest.json``."""
    return read_manifest_with_digest(pack_dir)[0]


def write_manifest(pack_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Write manifest.json (validating first, so we never write one we would refuse to read) and fsync it."""
    manifest_from_dict(json.loads(manifest.to_json()), where="manifest being written")
    path = Path(pack_dir) / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    return path
