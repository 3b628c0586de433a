"""The streaming loop: disk -> host (ring or cache) -> device slot -> compute callback, overlapped.

Schedule positions are a global counter t = 0, 1, 2, ... over the forward's units (unit = t mod U), so the prefetch
for the first blocks of the next forward starts while the last blocks of this one compute: steps run back to back.
For each position the loop does exactly the schedule it implements:

    read    disk workers fill a host buffer (ring slot, or the unit's cache buffer on its first pass)
    copy    one H2D copy into device slot t mod K on the copy stream, after that slot's "free" event
    wait    the compute stream waits for the slot's "ready" event (GPU-side; the CPU never blocks on compute)
    compute the callback runs on block-relative tensor views of the slot
    release the compute stream records the slot's "free" event

Reads run up to ``prefetch + host_slots`` positions ahead, copies up to ``prefetch`` ahead. A ring slot is handed back
as soon as its copy is queued; the worker that refills it first waits for that copy's event, so host bytes are never
overwritten early and the main thread never waits for the GPU. With K slots = U units (granularity ``model``) every
unit stays in its own slot after the first pass and later forwards copy nothing.

Three things keep a whole run (not just one forward) at the speed of its GPU work:
  * ``prefetch_cache()`` queues the reads of every unit the host cache will hold, at a low priority, as soon as the
    engine exists: the DiT's first step is read from disk while the text encoder runs. Cache buffers are allocated
    and pinned by the worker that fills them, never on the thread that launches kernels.
  * Several engines may share one :class:`DiskReader` (``reader=``): its priority queue lets the encoder that is
    needed now read ahead of blocks wanted later.
  * The CPU runs at most ``PACE_UNITS`` units ahead of the GPU, waiting on blocking events (the thread sleeps instead
    of spinning in a full launch queue), so a run costs a fraction of a core while the GPU is busy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from wanpack.errors import UsageError
from wanpack.runtime.ops.devices import concrete_device
from wanpack.runtime.pack import PackComponent, Unit, WeightViews, views
from wanpack.runtime.stream.device import DeviceTier
from wanpack.runtime.stream.graphs import GraphRunner
from wanpack.runtime.stream.host import HostTier, ShardMaps
from wanpack.runtime.stream.reader import (
    ChecksumError,
    DiskReader,
    ReadRequest,
    ShardFile,
    ShardReadError,
    open_shard,
    sha256_file,
)

ABANDON_WAIT_S = 10.0  # how long a stopped forward waits for in-flight reads before closing the engine
PACE_UNITS = 2  # how many units' compute the CPU may queue ahead of the GPU
MAX_INLINE_PREFIX = 64 << 20  # shard bytes before a unit that we are willing to hash again for in-stream verification


@dataclass
class StreamOptions:
    """How to stream; the planner fills these from budgets (runtime/stream/planner.py), tests set them directly."""

    granularity: str = "block"  # model | block | phase
    device_slots: int = 2
    prefetch: int = 1  # copies queued ahead of the unit being computed (<= device_slots - 1)
    host_slots: int = 3  # pinned ring slots for units read from disk each pass
    cache_units: list[int] = field(default_factory=list)  # unit indices (schedule order) kept in RAM after 1st read
    disk_workers: int = 4
    chunk_bytes: int = 16 << 20
    direct_io: bool = True
    verify: bool = False  # check every shard's sha256 once (in-stream when a unit covers the shard)
    read_timeout_s: float = 120.0
    timeline: bool = False
    graph: bool = False  # capture/replay each unit's compute in CUDA graphs (static shapes only)
    read_delay_s: float = 0.0  # tests: a deliberately slow disk
    priority: int = 0  # read priority on a shared DiskReader (lower reads first); cache prefetch uses priority + 1
    mapped: bool = False  # host bytes are read-only mappings of the page cache (no ring, no cache buffers, no copies)
    pin_mapped: bool = True  # page-lock mapped units for DMA; off: copies come from pageable memory (read-once units)


class StreamEngine:
    """Streams one pack component's blocks through host and device tiers; see the module docstring."""

    def __init__(self, pack: PackComponent, options: StreamOptions, device: torch.device | str = "cpu",
                 reader: DiskReader | None = None, resident_skip: tuple[str, ...] = ()):  # fmt: skip
        self.pack = pack
        self.opt = options
        self.device = concrete_device(device)
        self.units: list[Unit] = pack.units(options.granularity)
        n = len(self.units)
        k = n if options.granularity == "model" else options.device_slots
        if k < 1 or options.host_slots < 1 or not (0 <= options.prefetch <= k - 1):
            raise UsageError(f"prefetch {options.prefetch} needs device slots >= prefetch + 1 (have {k}) and at "
                             "least one host slot - lower --prefetch or raise --slots")  # fmt: skip
        if options.graph and self.device.type != "cuda":
            raise UsageError("graph mode (ENABLE_GRAPH_MODE / --graph-mode) needs a CUDA device - turn it off on CPU")
        self.k = k
        self.prefetch = options.prefetch
        cuda = self.device.type == "cuda"
        self._closed = False
        self.files: dict[str, ShardFile] = {}
        self.reader: DiskReader | None = reader
        self._owns_reader = reader is None
        self._requests: list[ReadRequest] = []  # this engine's reads not yet known to be complete
        self.host: HostTier | None = None
        self.dev: DeviceTier | None = None
        self.graphs = GraphRunner(self.device) if options.graph else None
        self._t = 0  # next schedule position to compute
        self._next_read = 0  # next position whose host bytes are not arranged yet
        self._next_copy = 0  # next position not yet copied to its device slot
        self._epoch = 0  # first position since the last restart (copies before it may not have happened)
        self._end: int | None = None  # no reads are arranged at or past this position (limit_forwards)
        self._host: dict[int, tuple[torch.Tensor | None, ReadRequest | None, object]] = {}
        self._cache_reqs: dict[int, ReadRequest] = {}
        self._ready: dict[int, torch.Tensor] = {}  # mapped mode: units whose range is faulted in (and pinned)
        self.maps: ShardMaps | None = None
        self._views: dict[tuple[int, int], WeightViews] = {}
        self._statics: dict[tuple, torch.Tensor] = {}
        self.current_slot = -1
        self.forwards = 0
        self.bytes_requested = 0  # disk bytes asked of the workers (counted at submit: deterministic)
        self.read_wait_s: list[float] = []  # per forward: how long the main thread waited for host bytes
        self._first_submit: float | None = None  # perf_counter of the first read queued, of the last one completed
        self._last_read_done: float | None = None
        try:
            self.resident = pack.load_resident(self.device, skip=resident_skip)
            if options.mapped:
                self.maps = ShardMaps(pin=cuda and options.pin_mapped)
            for shard in sorted({u.shard for u in self.units}):
                sf = open_shard(pack.path(shard), pack.entry.shard(shard).size, options.direct_io and not options.mapped)
                self.files[shard] = sf
                if self.maps is not None and sf.size:
                    sf.map_base = self.maps.base(sf.path, sf.fd, sf.size)
            self._verify_inline = self._prepare_verification() if options.verify else {}
            slot_bytes = max(u.length for u in self.units)
            cache = {i: self.units[i].length for i in options.cache_units if 0 <= i < n}
            if self.reader is None:
                self.reader = DiskReader(options.disk_workers, options.chunk_bytes, options.read_delay_s)
            event = _blocking_event if cuda else None
            self.host = HostTier(options.host_slots, slot_bytes, pin=cuda, cache_units=cache,
                                 **({"event_factory": event} if event else {}))  # fmt: skip
            self.dev = DeviceTier(self.device, k, slot_bytes, timeline=options.timeline, pace_units=PACE_UNITS)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------ public

    def forward(self) -> Iterator[tuple[Unit, Mapping[str, torch.Tensor]]]:
        """Yield (unit, block-relative weights) for one forward, in order. Use the weights before the next step."""
        self._check_open()
        self.dev.take_slots()  # given back between jobs: taken again here, every unit copied anew
        self.read_wait_s.append(0.0)
        done = False
        try:
            for _ in range(len(self.units)):
                pos = self._t
                unit = self.units[pos % len(self.units)]
                slot = pos % self.k
                self._fill(pos)
                self.dev.wait_ready(slot)
                self.dev.pace(pos)
                self.current_slot = slot
                with self.dev.compute_span(unit.index):
                    yield unit, self._weights(slot, unit)
                self.dev.release(slot, pos)
                self._t += 1
            done = True
            self.forwards += 1
        finally:
            self.current_slot = -1
            if not done:
                self._abandon()

    def run(self, x: torch.Tensor, fn: Callable, *extras: torch.Tensor,
            graph_key: Callable[[Unit, int], tuple] | None = None) -> torch.Tensor:  # fmt: skip
        """One forward: ``x = fn(unit, weights, x, *extras)`` per unit (fn may also update x in place).

        In graph mode x and the extras are first copied into static buffers that stay put for the whole forward,
        and each unit's call is captured once per ``graph_key(unit, slot)`` (default: slot + tensor layout) and
        replayed afterwards. Extras may double as state passed between units (write into them in place).
        """
        if self.graphs is None:
            for unit, weights in self.forward():
                y = fn(unit, weights, x, *extras)
                x = x if y is None else y
            return x
        x_s = self._static(0, x)
        del x  # only the static copy stays alive during the forward
        ex_s = [self._static(i + 1, e) for i, e in enumerate(extras)]
        for unit, weights in self.forward():
            key = graph_key(unit, self.current_slot) if graph_key else (self.current_slot, unit.layout_key())

            def thunk(unit=unit, weights=weights) -> None:
                y = fn(unit, weights, x_s, *ex_s)
                if y is not None and y is not x_s:
                    x_s.copy_(y)

            self.graphs.run((key, _sig(x_s), *(_sig(e) for e in ex_s)), thunk)
        for e, e_s in zip(extras, ex_s, strict=True):
            e.copy_(e_s)
        return x_s.clone()

    def _static(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """The static buffer for argument ``i`` of this shape and dtype (allocated once), holding a copy of ``t``."""
        key = (i, *_sig(t))
        if key not in self._statics:
            self._statics[key] = torch.empty_like(t)
        buf = self._statics[key]
        buf.copy_(t)
        return buf

    def limit_forwards(self, n: int) -> None:
        """Only the next ``n`` forwards are needed (a job's steps, an encoder's one pass): reads stop at the end of
        the n-th instead of running ahead into a forward that never comes, bytes a disk-bound run pays for nothing
        (the T5's four ring slots were 0.77 GB per run). A forward past the limit still runs, reading as it goes."""
        n_units = len(self.units)
        self._end = -(-self._t // n_units) * n_units + max(0, n) * n_units if n_units else None

    def prefetch_cache(self) -> int:
        """Queue the reads of every unit the host cache will hold (and the first ring positions), lowest priority
        first in schedule order; returns the bytes queued. Call right after construction to overlap the first
        forward's reads with whatever runs before it (the encoders)."""
        self._check_open()
        before = self.bytes_requested
        self._arrange_ahead(self._t)
        for index in sorted(self.host.cache_plan):
            if index not in self.host.cached_ready and index not in self._cache_reqs:
                unit = self.units[index]
                self._cache_reqs[index] = self._submit(unit, None, None, self.opt.priority + 1,
                                                       make_dest=lambda i=index: self.host.cache_buffer(i))  # fmt: skip
        if self.maps is not None:
            for unit in self.units:
                if unit.index not in self._ready and unit.index not in self._cache_reqs:
                    self._map(unit, self.opt.priority + 1)
        return self.bytes_requested - before

    def stats(self) -> dict:
        return {
            "granularity": self.opt.granularity, "units": len(self.units), "device_slots": self.k,
            "prefetch": self.prefetch, "host_slots": len(self.host.slots) if self.host else 0,  # allocated
            "cached_units": sorted(self.host.cache_plan) if self.host else [],
            "disk_bytes": self.reader.bytes_read if self.reader else 0, "requested_bytes": self.bytes_requested,
            "buffers_allocated_ahead": self.reader.allocated_ahead if self.reader else 0,
            "h2d_bytes": self.dev.bytes_copied if self.dev else 0,
            "pinned_bytes": (self.host.pinned_bytes if self.host else 0) + (self.maps.registered_bytes if self.maps else 0),
            "mapped": self.maps is not None, "map_pin_error": self.maps.register_error if self.maps else None,
            "direct_io": {s: f.direct for s, f in self.files.items()},
            "read_mode": sorted({f.mode for f in self.files.values()}),
            "graph_replays": self.graphs.replays if self.graphs else 0,
            "graph_captures": self.graphs.captures if self.graphs else 0,
            "read_wait_s": [round(w, 3) for w in self.read_wait_s],
            "read_span_s": self.read_span_s(),
        }  # fmt: skip

    def read_span_s(self) -> float | None:
        """Seconds from this engine's first queued read to the completion of the last one a forward has used (how
        fast its bytes came, beside whatever else ran meanwhile); None before any read was used."""
        if self._first_submit is None or self._last_read_done is None:
            return None
        return round(self._last_read_done - self._first_submit, 3)

    def release_device(self) -> int:
        """Give the GPU slots back until the next forward, so another stage (a session's decode) can use the memory;
        returns the bytes freed. Host-side state stays (mappings, locked pages, the host cache), so the next forward
        only copies its units again, as a streamed forward does anyway. Nothing is freed when every unit has its own
        slot (the model is resident: freeing would mean copying all of it again) or in graph mode (captured graphs
        hold the slots' addresses)."""
        self._check_open()
        if self.dev is None or not self.dev.holding or self.graphs is not None or self.k % len(self.units) == 0:
            return 0
        self._abandon()  # drop what was arranged ahead for the next forward: it restarts at its first unit
        if self._closed:
            return 0
        self._views.clear()
        return self.dev.drop_slots()

    def timeline(self) -> list[dict]:
        return self.dev.timeline_ms() if self.dev else []

    def close(self) -> None:
        """Stop the workers, wait for in-flight reads and copies, unlock and free host memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.reader is not None:
            if self._owns_reader:
                self.reader.close()
            else:  # a shared reader keeps running: skip our queued chunks (their buffers stay referenced until done)
                for req in self._requests:
                    if not req.done.is_set():
                        req._fail(ShardReadError(f"{req.what}: read cancelled, the stream closed"))
        if self.dev is not None:
            self.dev.close()
            if self.dev.cuda:
                torch.cuda.current_stream(self.device).synchronize()
        if self.host is not None:
            self.host.close()
        if self.maps is not None:
            self.maps.close()
        self._ready.clear()
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()
        self._host.clear()
        self._views.clear()

    def __enter__(self) -> StreamEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ schedule

    def _fill(self, pos: int) -> None:
        """Arrange reads ahead, issue the copy for ``pos`` (waiting for its bytes if needed) and any ready ones after."""
        self._arrange_ahead(pos)
        while self._next_copy <= pos:
            if self._next_copy >= self._next_read:
                if not self._arrange(self._next_copy):
                    raise RuntimeError("no host slot free for the unit being computed (schedule bug)")
                self._next_read += 1
            self._copy(self._next_copy, block=True)
            self._next_copy += 1
        while self._next_copy <= pos + self.prefetch and self._next_copy < self._next_read:
            if not self._copy(self._next_copy, block=False):
                break
            self._next_copy += 1
        self._arrange_ahead(pos)

    def _arrange_ahead(self, pos: int) -> None:
        limit = pos + self.prefetch + self.host.ring_slots
        if self._end is not None and pos < self._end:
            limit = min(limit, self._end - 1)
        while self._next_read <= limit and self._arrange(self._next_read):
            self._next_read += 1

    def _arrange(self, pos: int) -> bool:
        """Decide where position ``pos``'s bytes come from and start reading them; False when no ring slot is free."""
        unit = self.units[pos % len(self.units)]
        slot = pos % self.k
        resident = self.k % len(self.units) == 0  # every unit has its own slot (granularity model)
        if resident and (self.dev.owner[slot] == unit.index or pos - self.k >= self._epoch):
            self._host[pos] = (None, None, None)  # already in its slot, or copied there by position pos - k
        elif unit.index in self.host.cached_ready:
            self._host[pos] = (self.host.cache[unit.index][0], None, None)
        elif unit.index in self._ready:
            self._host[pos] = (self._ready[unit.index], None, None)
        elif unit.index in self._cache_reqs:
            self._host[pos] = (None, self._cache_reqs[unit.index], None)  # the buffer is the request's (made lazily)
        elif unit.index in self.host.cache_plan:
            req = self._submit(unit, None, None, self.opt.priority,
                               make_dest=lambda i=unit.index: self.host.cache_buffer(i))  # fmt: skip
            self._cache_reqs[unit.index] = req
            self._host[pos] = (None, req, None)
        elif self.maps is not None:
            self._host[pos] = (None, self._map(unit, self.opt.priority), None)
        else:
            ring = self.host.take_slot()
            if ring is None:
                return False
            ring.unit = pos
            req = self._submit(unit, ring.buf, ring.event, self.opt.priority)
            self._host[pos] = (ring.buf, req, ring)
        return True

    def _map(self, unit: Unit, priority: int) -> ReadRequest:
        """Mapped mode: fault the unit's pages in (workers) and pin them where they are (the completing worker)."""
        sf = self.files[unit.shard]
        view = self.maps.view(sf.path, unit.offset, unit.length)
        req = self._submit(unit, view, None, priority, populate=True, finish=lambda: self.maps.register(view))
        self._cache_reqs[unit.index] = req
        return req

    def _submit(self, unit: Unit, buf: torch.Tensor | None, pre_event, priority: int, make_dest=None,
                populate: bool = False, finish=None) -> ReadRequest:  # fmt: skip
        sf = self.files[unit.shard]
        expected = max(0, min(unit.length, sf.size - unit.offset))
        verify = self._verify_inline.pop(unit.index, None)
        req = ReadRequest(sf, unit.offset, buf, expected, unit.name, pre_event=pre_event, verify=verify,
                          priority=priority, make_dest=make_dest, populate=populate, finish=finish)  # fmt: skip
        self.bytes_requested += expected
        if self._first_submit is None:
            self._first_submit = time.perf_counter()
        self._requests = [r for r in self._requests if not r.done.is_set()]
        self._requests.append(req)
        return self.reader.submit(req)

    def _copy(self, pos: int, block: bool) -> bool:
        """Queue the H2D copy of position ``pos``; when not ``block``, only if its bytes are already read."""
        buf, req, ring = self._host[pos]
        unit = self.units[pos % len(self.units)]
        slot = pos % self.k
        if req is not None:
            if not req.done.is_set() and not block:
                return False
            t = time.perf_counter()
            req.wait(self.opt.read_timeout_s, self.reader.alive)
            if self.read_wait_s:  # (prefetch_cache may arrange positions before any forward)
                self.read_wait_s[-1] += time.perf_counter() - t
            self._last_read_done = max(self._last_read_done or 0.0, req.finished)
            if buf is None:
                buf = req.dest
        if buf is not None:
            self.dev.copy_in(slot, buf, min(unit.length, buf.numel()), unit.index,
                             host_event=ring.event if ring is not None else None)  # fmt: skip
        if ring is not None:
            self.host.give_back(ring)
        elif req is not None and self._cache_reqs.get(unit.index) is req:
            del self._cache_reqs[unit.index]
            if req.populate:
                self._ready[unit.index] = req.dest
            else:
                self.host.cached_ready.add(unit.index)
        del self._host[pos]
        return True

    def _abandon(self) -> None:
        """The consumer stopped mid-forward (error, break, Ctrl-C): drain reads and restart at the next forward."""
        deadline = time.monotonic() + min(ABANDON_WAIT_S, self.opt.read_timeout_s)
        for _buf, req, ring in self._host.values():
            if req is not None and not req.done.wait(max(0.0, deadline - time.monotonic())):
                self.close()  # a stalled read still owns its buffer: stop here rather than hang (Ctrl-C stays quick)
                return
            if ring is not None:
                self.host.give_back(ring)
        for unit_index, req in list(self._cache_reqs.items()):
            if req.error is not None or not req.done.is_set():
                del self._cache_reqs[unit_index]
        self._host.clear()
        n = len(self.units)
        self._t = -(-self._t // n) * n
        self._next_read = self._next_copy = self._epoch = self._t

    def _weights(self, slot: int, unit: Unit) -> WeightViews:
        key = (slot, unit.index)
        if key not in self._views:
            self._views[key] = WeightViews(views(self.dev.slots[slot], unit))
        return self._views[key]

    def _prepare_verification(self) -> dict[int, tuple[bytes, str]]:
        """Shards that one unit covers to their end are hashed in-stream on first read; the rest are hashed now."""
        inline: dict[int, tuple[bytes, str]] = {}
        covered: set[str] = set()
        for u in self.units:
            sf = self.files[u.shard]
            first = not any(v.shard == u.shard and v.offset < u.offset for v in self.units)
            if u.shard not in covered and first and u.offset <= MAX_INLINE_PREFIX and u.offset + u.length >= sf.size:
                inline[u.index] = (_read_prefix(sf.path, u.offset), self.pack.entry.shard(u.shard).sha256)
                covered.add(u.shard)
        rest = [s for s in self.files if s not in covered]
        with ThreadPoolExecutor(max(1, self.opt.disk_workers)) as pool:
            for shard, digest in zip(rest, pool.map(lambda s: sha256_file(self.files[s]), rest), strict=True):
                if digest != self.pack.entry.shard(shard).sha256:
                    raise ChecksumError(f"{self.files[shard].path}: sha256 does not match the manifest - the shard is "
                                        "corrupt; run `wanpack verify` and convert again")  # fmt: skip
        return inline

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("this stream engine is closed - open a new one")


def _blocking_event():
    """A CUDA event whose synchronize() puts the waiting thread to sleep instead of spinning a core."""
    return torch.cuda.Event(blocking=True)


def _sig(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype


def _read_prefix(path, n: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(n)
    return data
