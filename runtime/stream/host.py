"""Host tier: a fixed ring of (pinned) slots for units streamed from disk, plus an optional cache bounded by RAM.

Pinned memory is taken with cudaHostRegister on our own 4096-aligned allocations rather than torch's pinned caching
allocator, which rounds every request up to a power of two (a 700 MB block would lock 1 GiB) and keeps freed blocks
locked until process exit. Here every byte we lock is a byte we use, and :meth:`HostTier.close` unlocks and frees all
of it (also on Ctrl-C). On the CPU path nothing is pinned and events are plain completed markers.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from wanpack.runtime.stream.reader import aligned_empty


class DoneEvent:
    """Stand-in for a CUDA event on the CPU path: CPU copies are synchronous, so it is always complete."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def host_alloc(nbytes: int, pin: bool) -> tuple[torch.Tensor, bool]:
    """An aligned uint8 buffer; page-locked when ``pin`` (returns whether that worked)."""
    buf = aligned_empty(nbytes)
    if not pin:
        return buf, False
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
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
        """The cache buffer for a planned unit (allocated on first use), or None when the unit is not cached."""
        if unit not in self.cache_plan:
            return None
        if unit not in self.cache:
            self.cache[unit] = host_alloc(self.cache_plan[unit], self.pin)
        return self.cache[unit][0]

    def close(self) -> None:
        """Unlock and drop every buffer (ring and cache)."""
        for s in self.slots:
            host_free(s.buf, s.pinned)
        for buf, pinned in self.cache.values():
            host_free(buf, pinned)
        self.slots.clear()
        self._free.clear()
        self.cache.clear()
        self.cached_ready.clear()
