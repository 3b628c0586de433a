"""`wanpack convert`: stream a source checkpoint into a pack, one tensor at a time.

The whole pack is planned from the source headers before a byte is written (so free space is checked up front and
every tensor's offset is known). Then a reader thread reads each source file once, front to back, hashing it on the
way; the calling thread merges LoRAs, quantizes or casts each tensor and writes it straight to its planned offset
with pwrite; finished shards are hashed by a small pool. Memory stays around a few source tensors, whatever the
model's size. Everything lands in a hidden temporary folder renamed into place at the end (see atomic.py).
"""

from __future__ import annotations

import errno
import json
import os
import queue
import resource
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanpack import __version__
from wanpack.convert.atomic import AtomicPackDir
from wanpack.convert.lora import Lora
from wanpack.convert.pack_layout import (
    SCALE_SUFFIX,
    OutTensor,
    ShardPlan,
    manifest_entries,
    plan_component_shards,
    quant_info,  # fmt: skip
)
from wanpack.convert.quantize import check_scheme, dequantize_weight, quantize_weight
from wanpack.convert.safetensors_io import ST_TO_TORCH
from wanpack.convert.sources import (
    BufferPool,
    PthSource,
    SafetensorsSource,
    open_pth_source,
    open_safetensors_source,
    sha256_file,
)
from wanpack.convert.synth import HUB_FILES, SYNTH_DECLARATION
from wanpack.errors import NoSpaceError, SourceError, UsageError
from wanpack.manifests import arch as archs
from wanpack.manifests.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ComponentEntry,
    Manifest,
    PackFile,
    SourceFile,
    SourceInfo,
    write_manifest,
)

COMPONENTS = ("dit", "t5", "clip", "vae")
TOKENIZER_DIR = "google/umt5-xxl"
READ_AHEAD_BYTES = 512 << 20  # source bytes read ahead of the quantizer


@dataclass
class ConvertOptions:
    quant: str = "int8"
    save_by_block: bool = True
    components: tuple[str, ...] = ("dit",)
    arch: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    keep_fp32: bool = False
    hash_source: bool = True
    force: bool = False


@dataclass
class ConvertStats:
    source_bytes: int = 0
    pack_bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    @property
    def gbps(self) -> float:
        return self.source_bytes / max(self.seconds, 1e-9) / 1e9


@dataclass
class ComponentJob:
    """One component: its config, its source, the shards planned for it."""

    name: str
    cfg: archs.ArchConfig
    arch_name: str
    source: SafetensorsSource | PthSource
    specs: dict[str, archs.TensorSpec]
    plans: list[ShardPlan]
    quant: object
    prequantized: set[str] = field(default_factory=set)
    extra_files: list[tuple[Path, str]] = field(default_factory=list)  # (source path, relative dest)


# ------------------------------------------------------------------------------------------------ configs


def _declared(source: Path) -> dict:
    path = (source if source.is_dir() else source.parent) / SYNTH_DECLARATION
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SourceError(f"{path}: not valid JSON - regenerate the synthetic checkpoint") from None


def _dit_arch(opts: ConvertOptions, declared: dict, hub: dict) -> str:
    if opts.arch:
        return opts.arch
    if declared.get("arch"):
        return declared["arch"]
    if hub.get("model_type") == "i2v":
        return "wan2.1-i2v-14b"
    by_dim = {1536: "wan2.1-t2v-1.3b", 5120: "wan2.1-t2v-14b"}
    if hub.get("model_type") == "t2v" and hub.get("dim") in by_dim:
        return by_dim[hub["dim"]]
    raise UsageError("cannot tell which Wan2.1 model this is from its config.json - pass --arch "
                     f"({', '.join(archs.DIT_ARCHS)})")  # fmt: skip


def _component_config(kind: str, declared: dict) -> archs.ArchConfig:
    if kind in declared.get("configs", {}):
        return archs.config_from_dict(declared["configs"][kind])
    return archs.encoder_config(kind)


# ------------------------------------------------------------------------------------------------ planning


def _validate_keys(where: str, expected: dict[str, archs.TensorSpec], have: dict, ignore: tuple[str, ...] = (),
                   prequantized: set[str] = frozenset()) -> None:  # fmt: skip
    """Every expected key present with its shape, nothing unexpected (scales of pre-quantized weights allowed)."""
    for name, spec in expected.items():
        if name not in have:
            raise SourceError(f"{where}: missing tensor {name} {list(spec.shape)} - the checkpoint is incomplete or "
                              "not this architecture (check --arch)")  # fmt: skip
        if tuple(have[name].shape) != tuple(spec.shape):
            raise SourceError(f"{where}: tensor {name} has shape {list(have[name].shape)}, expected "
                              f"{list(spec.shape)} - the checkpoint is not this architecture (check --arch)")  # fmt: skip
    allowed = {n + SCALE_SUFFIX for n in prequantized}
    for name in have:
        if name not in expected and name not in allowed and not name.startswith(ignore):
            raise SourceError(f"{where}: unexpected tensor {name} - the checkpoint is not this architecture "
                              "(check --arch)")  # fmt: skip


def _prequantized(source, specs: dict[str, archs.TensorSpec]) -> tuple[set[str], str | None]:
    """Weights a LightX2V-style source already stores quantized, and the scheme they use."""
    have = source.tensors
    names, schemes = set(), set()
    for name in specs:
        if name + SCALE_SUFFIX in have:
            dtype = have[name].dtype
            schemes.add({torch.int8: "int8", torch.float8_e4m3fn: "fp8"}.get(dtype, str(dtype)))
            names.add(name)
    if len(schemes) > 1 or (schemes and not schemes <= {"int8", "fp8"}):
        raise SourceError(f"{source.files[0]}: quantized weights use {sorted(schemes)} - expected int8 or fp8 only")
    return names, (schemes.pop() if schemes else None)


def open_component(kind: str, source_dir: Path, opts: ConvertOptions, declared: dict):
    """The component's source, its config, architecture name, and the source keys to ignore."""
    if kind == "dit":
        source = open_safetensors_source(source_dir)
        arch_name = _dit_arch(opts, declared, source.config)
        if "dit" in declared.get("configs", {}):
            cfg = archs.config_from_dict(declared["configs"]["dit"])
        elif source.config:
            cfg = archs.dit_config_from_hub(source.config, arch_name)
        else:
            cfg = archs.dit_config(arch_name, layers=_count_blocks(source.tensors))
        if opts.arch:
            archs.check_arch_matches(cfg, opts.arch, declared.get("arch"))
        return source, cfg, arch_name, ()
    if not source_dir.is_dir():
        raise UsageError(f"--component {kind} needs the model folder as SOURCE, got the file {source_dir}")
    source = open_pth_source(source_dir / HUB_FILES[kind])
    cfg = _component_config(kind, declared)
    return source, cfg, cfg.name, archs.CLIP_UNUSED_PREFIXES if kind == "clip" else ()


def plan_job(kind: str, source, cfg: archs.ArchConfig, arch_name: str, ignore: tuple[str, ...], opts: ConvertOptions,
             tokenizer_dir: Path | None = None) -> ComponentJob:  # fmt: skip
    """Check an opened source against its architecture and plan its shards."""
    specs = {s.name: s for s in archs.component_tensors(cfg)}
    prequant, scheme = _prequantized(source, specs)
    if prequant and opts.quant not in (scheme, "none"):
        raise UsageError(f"{source.files[0]}: weights are already {scheme}-quantized - convert with --quant {scheme} "
                         "(or --quant none to dequantize); re-quantizing would compound the error")  # fmt: skip
    if prequant and opts.loras:
        raise UsageError("cannot merge a LoRA into already-quantized weights - merge it into the original checkpoint")
    where = str(source.files[0] if len(source.files) == 1 else getattr(source, "root", kind))
    _validate_keys(where, specs, source.tensors, ignore, prequant)
    keep = None
    if kind == "vae":
        keep = next(iter(source.tensors.values())).dtype
    scheme_here = opts.quant if kind != "vae" else "none"
    quant = quant_info(scheme_here, opts.keep_fp32)
    plans = plan_component_shards(kind, list(specs.values()), cfg.phases, quant,
                                  by_block=opts.save_by_block, keep_dtype=keep)  # fmt: skip
    job = ComponentJob(kind, cfg, arch_name, source, specs, plans, quant, prequant)
    if kind == "t5" and tokenizer_dir is not None and tokenizer_dir.is_dir():
        for f in sorted(tokenizer_dir.rglob("*")):
            if f.is_file():
                job.extra_files.append((f, f"t5/tokenizer/{f.relative_to(tokenizer_dir).as_posix()}"))
    return job


def _count_blocks(tensors: dict) -> int:
    idx = [int(n.split(".")[1]) for n in tensors if n.startswith("blocks.") and n.split(".")[1].isdigit()]
    return max(idx) + 1 if idx else 0


# ------------------------------------------------------------------------------------------------ executing


class _ByteBudget:
    """Bounds the source bytes read ahead of the quantizer (one oversized tensor may always pass)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def take(self, n: int, stop: threading.Event) -> None:
        with self.cond:
            while self.used > 0 and self.used + n > self.limit and not stop.is_set():
                self.cond.wait(0.1)
            self.used += n

    def give(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def _read_ahead(jobs: list[ComponentJob], hashes: dict[str, str] | None, budget: _ByteBudget,
                stop: threading.Event, on_bytes: Callable[[int], None]) -> Iterator[tuple[ComponentJob, str, torch.Tensor]]:  # fmt: skip
    """Run the sources' readers in a thread; yield (job, name, tensor) in read order, re-raising reader errors."""
    q: queue.Queue = queue.Queue()
    done = object()
    pool = BufferPool()

    def reader() -> None:
        try:
            for job in jobs:
                wanted = set(job.specs) | {n + SCALE_SUFFIX for n in job.prequantized}
                tensors = job.source.read_in_file_order(wanted, hashes, on_bytes, pool)
                try:
                    for name, tensor in tensors:
                        nbytes = tensor.numel() * tensor.element_size()
                        budget.take(nbytes, stop)
                        if stop.is_set():
                            return
                        q.put((job, name, tensor, nbytes))
                finally:
                    tensors.close()  # ends the source's own hashing thread now, not at garbage collection
            q.put(done)
        except BaseException as exc:  # handed to the main thread, which raises it
            q.put(exc)

    thread = threading.Thread(target=reader, name="wanpack-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            job, name, tensor, nbytes = item
            try:
                yield job, name, tensor  # the consumer is done with it when control comes back
            finally:
                pool.release(tensor)
                budget.give(nbytes)
    finally:
        stop.set()
        thread.join()  # no thread may outlive the conversion: interpreter shutdown under a running one can abort


class _ShardFiles:
    """Open output shards written by pwrite at planned offsets; once its last tensor lands a shard is synced, closed
    and hashed on a background thread (``results`` waits for them)."""

    def __init__(self, root: Path, jobs: list[ComponentJob]):
        self.root = root
        self.fds: dict[str, int] = {}
        self.remaining: dict[str, int] = {}
        self.where: dict[tuple[str, str], tuple[ShardPlan, int]] = {}  # (component, tensor) -> (plan, offset)
        for job in jobs:
            for plan in job.plans:
                self.remaining[plan.path] = len(plan.layout.real_tensors())
                for pt in plan.layout.real_tensors():
                    self.where[(job.name, pt.name)] = (plan, pt.offset)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanpack-hash")
        self.hashes: dict[str, Future] = {}
        self.finishing: list[tuple[Future, int]] = []  # shards handed to the pool with their still-open fd

    def write(self, component: str, name: str, tensor: torch.Tensor) -> int:
        plan, offset = self.where[(component, name)]
        fd = self.fds.get(plan.path)
        if fd is None:
            path = self.root / plan.path
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds[plan.path] = fd
            _pwrite_all(fd, plan.layout.header, 0)
            os.ftruncate(fd, plan.layout.file_size)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        _pwrite_all(fd, memoryview(data.numpy()), offset)
        self.remaining[plan.path] -= 1
        if self.remaining[plan.path] == 0:  # sync, close and hash off this thread (fsync alone took ~1 s per run)
            fd = self.fds.pop(plan.path)
            future = self.pool.submit(_finish_shard, fd, self.root / plan.path)
            self.hashes[plan.path] = future
            self.finishing.append((future, fd))
        return data.numel()

    def results(self) -> dict[str, str]:
        left = [p for p, n in self.remaining.items() if n]
        if left:
            raise SourceError(f"source ended before {left[0]} was complete - the checkpoint is missing tensors")
        return {p: f.result() for p, f in self.hashes.items()}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
        for future, fd in self.finishing:
            if future.cancelled():  # never ran, so never closed its fd
                os.close(fd)
        self.finishing.clear()


def _finish_shard(fd: int, path: Path) -> str:
    """A complete shard: flushed to disk, closed, then hashed from the page cache. Runs on the hash pool."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return sha256_file(path)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _transform(job: ComponentJob, name: str, tensor: torch.Tensor, loras: list[Lora],
               pending_scales: dict[str, torch.Tensor], out_pool: BufferPool) -> list[tuple[str, torch.Tensor]]:  # fmt: skip
    """Source tensor -> the pack tensors it becomes (quantized weight + scale, or a cast copy). Quantized weights
    land in a buffer from ``out_pool``, which the caller releases once they are written."""
    if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in job.prequantized:
        base = name[: -len(SCALE_SUFFIX)]
        scale = tensor.to(torch.float32).reshape(-1, 1)
        if job.quant.scheme == "none":
            pending_scales[base] = scale.clone()  # kept past this iteration: the read buffer is reused
            return []
        return [(name, scale)]
    spec = job.specs[name]
    if name in job.prequantized:
        if job.quant.scheme == "none":
            return [("__dequant__" + name, tensor.clone())]  # resolved once its scale has arrived
        return [(name, tensor)]
    for lora in loras:
        tensor = lora.apply(name, tensor)
    if spec.quantize and job.quant.scheme != "none":
        q, scale = quantize_weight(tensor, job.quant.scheme, out=out_pool.get(tensor.numel()))
        return [(name, q), (name + SCALE_SUFFIX, scale)]
    return [(name, tensor)]


def convert_checkpoint(source: str | os.PathLike, out: str | os.PathLike, options: ConvertOptions | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       log: Callable[[str], None] | None = None) -> tuple[Manifest, ConvertStats]:  # fmt: skip
    """Convert ``source`` into a pack at ``out``; returns the manifest written and timing/memory stats. ``log`` gets
    the rare messages about the folder (waiting for runs of the old pack, a pack recovered after a crash)."""
    opts = options or ConvertOptions()
    check_scheme(opts.quant)
    for c in opts.components:
        if c not in (*COMPONENTS, "all"):
            raise UsageError(f"unknown --component {c!r} - choose from {', '.join(COMPONENTS)} or all")
    source_dir = Path(source)
    declared = _declared(source_dir)
    started = time.perf_counter()
    wanted = list(COMPONENTS) if "all" in opts.components else [c for c in COMPONENTS if c in opts.components]
    jobs: list[ComponentJob] = []
    for kind in wanted:
        is_t2v = bool(jobs) and jobs[0].name == "dit" and getattr(jobs[0].cfg, "model_type", "") == "t2v"
        if kind == "clip" and "all" in opts.components and is_t2v:
            continue  # text-to-video models have no image encoder
        opened = open_component(kind, source_dir, opts, declared)
        tokenizer = source_dir / TOKENIZER_DIR if source_dir.is_dir() else None
        jobs.append(plan_job(kind, *opened, opts, tokenizer_dir=tokenizer))
    return write_pack(jobs, out, opts, source_dir, progress, started, log)


def write_pack(jobs: list[ComponentJob], out: str | os.PathLike, opts: ConvertOptions, source_dir: Path,
               progress: Callable[[int, int], None] | None = None, started: float | None = None,
               log: Callable[[str], None] | None = None) -> tuple[Manifest, ConvertStats]:  # fmt: skip
    """Stream planned jobs into an atomic pack folder (the part shared by every kind of source)."""
    started = time.perf_counter() if started is None else started
    loras = [Lora.open(path, strength) for path, strength in opts.loras]
    dit = next((j for j in jobs if j.name == "dit"), None)
    if loras and dit is None:
        raise UsageError("--lora applies to the DiT - add --component dit")
    for lora in loras:
        lora.check_targets({n: s.shape for n, s in dit.specs.items()})
    pack_bytes = sum(p.layout.file_size for j in jobs for p in j.plans)
    pack_bytes += sum(src.stat().st_size for j in jobs for src, _ in j.extra_files)
    _check_space(Path(out), pack_bytes)
    source_bytes = sum(t.nbytes for j in jobs for t in j.source.tensors.values())

    hashes: dict[str, str] | None = {} if opts.hash_source else None
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], source_bytes)

    with AtomicPackDir(out, force=opts.force, log=log) as target:  # leaving it without commit() removes target.tmp
        files = _ShardFiles(target.tmp, jobs)
        try:
            _run(jobs, files, loras, hashes, on_bytes)
            shas = files.results()
            for job in jobs:
                for src, rel in job.extra_files:
                    (target.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, target.tmp / rel)
            manifest = _manifest(target.tmp, source_dir, jobs, shas, hashes, opts, loras)
            write_manifest(target.tmp, manifest)
            files.close()
            target.commit()
        except OSError as exc:
            files.close()
            if exc.errno == errno.ENOSPC:
                raise NoSpaceError(f"disk full while writing {out} (needs {pack_bytes / 1e9:.2f} GB) - free space "
                                   "and run again; nothing was left behind") from None  # fmt: skip
            raise
        except BaseException:
            files.close()
            raise
    stats = ConvertStats(source_bytes=source_bytes, pack_bytes=pack_bytes, seconds=time.perf_counter() - started,
                         peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    return manifest, stats


def _run(jobs: list[ComponentJob], files: _ShardFiles, loras: list[Lora], hashes: dict[str, str] | None,
         on_bytes: Callable[[int], None]) -> None:  # fmt: skip
    stop = threading.Event()
    budget = _ByteBudget(READ_AHEAD_BYTES)
    held: dict[tuple[str, str], torch.Tensor] = {}  # pre-quantized weights waiting for their scale (--quant none)
    scales: dict[str, torch.Tensor] = {}
    out_pool = BufferPool(keep=3)  # quantized outputs: written synchronously, so one buffer serves the next weight
    for job, name, tensor in _read_ahead(jobs, hashes, budget, stop, on_bytes):
        for out_name, value in _transform(job, name, tensor, loras if job.name == "dit" else [], scales, out_pool):
            if out_name.startswith("__dequant__"):
                held[(job.name, out_name.removeprefix("__dequant__"))] = value
                continue
            _write_cast(files, job, out_name, value)
            out_pool.release(value)
        for (comp, base), q in list(held.items()):
            if comp == job.name and base in scales:
                _write_cast(files, job, base, dequantize_weight(q, scales.pop(base)))
                del held[(comp, base)]


def _write_cast(files: _ShardFiles, job: ComponentJob, name: str, value: torch.Tensor) -> None:
    plan, _ = files.where[(job.name, name)]
    entry: OutTensor = next(t for t in plan.tensors if t.name == name)
    files.write(job.name, name, value.to(ST_TO_TORCH[entry.dtype]))


def _check_space(out: Path, needed: int) -> None:
    probe = out.absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * 1.01 + (16 << 20) > free:
        raise NoSpaceError(f"{out}: the pack needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free on "
                           f"{probe} - free space or choose another --out")  # fmt: skip


def _pack_file(root: Path, rel: str) -> PackFile:
    """A copied extra file (tokenizer) as the manifest records it: size and sha256 of the copy in the pack."""
    return PackFile(path=rel, size=(root / rel).stat().st_size, sha256=sha256_file(root / rel))


def _manifest(root: Path, source_dir: Path, jobs: list[ComponentJob], shas: dict[str, str],
              hashes: dict[str, str] | None, opts: ConvertOptions, loras: list[Lora]) -> Manifest:  # fmt: skip
    components = {}
    files: list[SourceFile] = []
    for job in jobs:
        shards, blocks = manifest_entries(job.plans, job.cfg.phases, shas)
        components[job.name] = ComponentEntry(
            name=job.name, arch=job.arch_name, config=archs.config_to_dict(job.cfg), quant=job.quant,
            layout="by_block" if opts.save_by_block else "single", num_blocks=len(blocks), shards=shards,
            blocks=blocks, files=[_pack_file(root, rel) for _, rel in job.extra_files],
        )  # fmt: skip
        for f in job.source.files:
            files.append(SourceFile(name=f.name, size=f.stat().st_size, sha256=(hashes or {}).get(f.name)))
    kinds = sorted({j.source.kind for j in jobs})
    synthetic = "synthetic" in kinds or bool(_declared(source_dir))  # random weights: generated, or a `wanpack synth` folder
    lora_info = [{"file": lo.path.name, "strength": lo.strength, "sha256": sha256_file(lo.path)} for lo in loras]
    return Manifest(format=FORMAT_NAME, format_version=FORMAT_VERSION, created_by=f"wanpack {__version__}",
                    source=SourceInfo(kind="+".join(kinds), path=str(source_dir.absolute()), files=files,
                                      lora=lora_info, synthetic=synthetic), components=components)  # fmt: skip
