"""Host tier: a fixed ring of (pinned) slots for units streamed from disk, plus an optional cache bounded by RAM;
or, in mapped mode, the page cache itself (:class:`ShardMaps`).

Pinned memory is taken with cudaHostRegister on our own 4096-aligned allocations rather than torch's pinned caching
allocator, which rounds every request up to a power of two (a 700 MB block would lock 1 GiB) and keeps freed blocks
locked until process exit. Here every byte we lock is a byte we use, and :meth:`HostTier.close` unlocks and frees all
of it (also on Ctrl-C). On the CPU path nothing is pinned and events are plain completed markers.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanpack.runtime.stream.reader import aligned_empty, prefault


class DoneEvent:
    """Stand-in for a CUDA event on the CPU path: CPU copies are synchronous, so it is always complete."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


CUDA_HOST_REGISTER_PORTABLE = 0x01
CUDA_HOST_REGISTER_READ_ONLY = 0x08  # the device only reads it: allowed on read-only (file) mappings


def host_alloc(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """An aligned uint8 buffer; page-locked when ``pin`` (returns whether that worked)."""
    buf = aligned_empty(nbytes)
    if not pin:
        return buf, False
    prefault(buf)
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), CUDA_HOST_REGISTER_PORTABLE)  # any context, any thread
    return buf, int(err) == 0  # registered: the driver copies from it asynchronously, like any pinned memory


def host_free(buf: torch.Tensor, pinned: bool) -> None:
    if pinned:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())


@dataclass
class HostSlot:
    """A ring slot. ``event`` marks the end of the last H2D copy out of it; readers wait on it before refilling."""

    index: int
    buf: torch.Tensor
    pinned: bool
    event: object = field(default_factory=DoneEvent)
    unit: int | None = None  # schedule position it currently holds (for the reuse ledger)


class HostTier:
    """Ring slots handed out in FIFO order, and a cache of whole units that stay after their first read."""

    def __init__(self, ring_slots: int, slot_bytes: int, pin: bool, cache_units: dict[int, int] | None = None,
                 event_factory=DoneEvent):  # fmt: skip
        self.pin = pin
        self._event_factory = event_factory
        self.slots: list[HostSlot] = []
        self._free: collections.deque[HostSlot] = collections.deque()
        self.cache_plan = dict(cache_units or {})  # unit index -> bytes, the units chosen to stay
        self.cache: dict[int, tuple[torch.Tensor, bool]] = {}
        self.cached_ready: set[int] = set()
        self.ring_slots = ring_slots
        self.slot_bytes = slot_bytes
        self._lock = threading.Lock()
        self._closed = False

    @property
    def pinned_bytes(self) -> int:
        ring = sum(s.buf.numel() for s in self.slots if s.pinned)
        return ring + sum(b.numel() for b, p in self.cache.values() if p)

    @property
    def cache_bytes(self) -> int:
        return sum(b.numel() for b, _ in self.cache.values())

    def take_slot(self) -> HostSlot | None:
        """A free ring slot, allocated on first need (a fully cached pack never allocates its ring), or None."""
        if not self._free and len(self.slots) < self.ring_slots:
            buf, pinned = host_alloc(self.slot_bytes, self.pin)
            self.slots.append(HostSlot(len(self.slots), buf, pinned, self._event_factory()))
            return self.slots[-1]
        return self._free.popleft() if self._free else None

    def give_back(self, slot: HostSlot) -> None:
        slot.unit = None
        self._free.append(slot)

    def free_slots(self) -> int:
        return len(self._free) + self.ring_slots - len(self.slots)

    def cache_buffer(self, unit: int) -> torch.Tensor | None:
        """The cache buffer for a planned unit (allocated and pinned on first use, by whichever thread asks first:
        usually the disk worker that fills it), or None when the unit is not cached."""
        if unit not in self.cache_plan:
            return None
        with self._lock:
            if self._closed:
                raise RuntimeError("host tier closed while a read was still starting")
            if unit not in self.cache:
                self.cache[unit] = host_alloc(self.cache_plan[unit], self.pin)
            return self.cache[unit][0]

    def close(self) -> None:
        """Unlock and drop every buffer (ring and cache)."""
        with self._lock:
            self._closed = True
        for s in self.slots:
            host_free(s.buf, s.pinned)
        for buf, pinned in self.cache.values():
            host_free(buf, pinned)
        self.slots.clear()
        self._free.clear()
        self.cache.clear()
        self.cached_ready.clear()


class ShardMaps:
    """Read-only mappings of whole shards: a unit's host bytes are the page cache's own pages, never a copy.

    Used when the planner reads through the page cache (RAM holds the pack). A unit's range is faulted in by the disk
    workers (MADV_POPULATE_READ) and then page-locked in place with cudaHostRegister(READ_ONLY), so the GPU copies
    straight out of the page cache at the link's full rate: no memcpy on the CPU, no second copy of the pack in RAM,
    and the next run (or job) finds the same pages still cached. Where the driver refuses to lock file pages the
    copies still work, from pageable memory and more slowly; ``register_error`` says why.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self._maps: dict[Path, tuple[mmap.mmap, int, int]] = {}  # path -> (mapping, address, size)
        self._registered: set[int] = set()
        self.registered_bytes = 0
        self.register_error: str | None = None
        self._lock = threading.Lock()

    def base(self, path: Path, fd: int, size: int) -> int:
        """Map the shard (once) and return its address."""
        with self._lock:
            if path not in self._maps:
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                self._maps[path] = (mm, _address(mm), size)
            return self._maps[path][1]

    def view(self, path: Path, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor over bytes [offset, offset + nbytes) of a mapped shard (no copy)."""
        _, addr, size = self._maps[path]
        nbytes = max(0, min(nbytes, size - offset))
        return torch.frombuffer((ctypes.c_uint8 * max(nbytes, 1)).from_address(addr + offset), dtype=torch.uint8)[:nbytes]

    def register(self, view: torch.Tensor) -> None:
        """Page-lock a mapped range for DMA (once per range); a refusal is remembered, not raised."""
        if not self.pin or view.numel() == 0 or self.register_error is not None or view.data_ptr() in self._registered:
            return
        nbytes = (view.numel() + 4095) // 4096 * 4096
        flags = CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_READ_ONLY
        err = torch.cuda.cudart().cudaHostRegister(view.data_ptr(), nbytes, flags)
        with self._lock:
            if int(err) == 0:
                self._registered.add(view.data_ptr())
                self.registered_bytes += nbytes
            else:
                self.register_error = f"cudaHostRegister of a file mapping failed (error {int(err)})"

    def close(self) -> None:
        """Unlock every range and unmap (the engine has waited for its copies)."""
        with self._lock:
            for ptr in self._registered:
                torch.cuda.cudart().cudaHostUnregister(ptr)
            self._registered.clear()
            self.registered_bytes = 0
            for mm, _, _ in self._maps.values():
                mm.close()
            self._maps.clear()


def _address(mm: mmap.mmap) -> int:
    """Address of a read-only mapping (ctypes' from_buffer wants a writable buffer, numpy does not)."""
    import numpy as np

    return int(np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data)
