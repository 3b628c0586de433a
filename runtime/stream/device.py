"""Device tier: K preallocated slots, a dedicated copy stream, and per-slot ready/free events.

A slot's address never changes while the slots are held (CUDA graphs captured over a slot stay valid); between jobs a
session may drop them (``drop_slots``) so the VAE gets their memory, and the next forward takes them anew. The copy of unit t
into slot t % K waits (on the GPU, not the CPU) for the "free" event the compute stream recorded after the slot's
previous consumer, and records "ready" when done; compute waits for "ready". Nothing here synchronizes the device or
calls record_stream. On the CPU path the same calls become a plain synchronous copy and always-complete events.
"""

from __future__ import annotations

import contextlib
import time

import torch

from wanpack.runtime.stream.host import DoneEvent


class DeviceTier:
    """K slots of ``slot_bytes`` on ``device`` and the events that gate their reuse."""

    def __init__(self, device: torch.device, slots: int, slot_bytes: int, timeline: bool = False, pace_units: int = 2):
        self.device = device
        self.cuda = device.type == "cuda"
        self.timeline = timeline
        self.k = slots
        self.slot_nbytes = (slot_bytes + 4095) // 4096 * 4096
        self.slots: list[torch.Tensor] = []
        self.owner: list[int | None] = []  # unit index held (skip the copy when it is already there)
        self.take_slots()
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in range(slots)]
            self.free = [torch.cuda.Event() for _ in range(slots)]
        else:
            self.copy_stream = None
            self.ready = [DoneEvent() for _ in range(slots)]
            self.free = [DoneEvent() for _ in range(slots)]
        # CPU pacing: one blocking event per unit of lead; the CPU waits (asleep) for unit t - pace_units to finish
        self.paced = [torch.cuda.Event(blocking=True) for _ in range(pace_units)] if self.cuda and pace_units else []
        self._pace_recorded = [False] * len(self.paced)
        self.events: list[tuple[str, int, object, object]] = []  # (kind, unit, start, end) for the timeline
        self.bytes_copied = 0

    def __len__(self) -> int:
        return self.k

    @property
    def holding(self) -> bool:
        return bool(self.slots)

    def take_slots(self) -> None:
        """Allocate the slots (at construction, and again after ``drop_slots``); they hold nothing yet."""
        if not self.slots:
            self.slots = [torch.empty(self.slot_nbytes, dtype=torch.uint8, device=self.device) for _ in range(self.k)]
            self.owner = [None] * self.k

    def drop_slots(self) -> int:
        """Free the slots' memory once the copies queued into them have run (work queued on the compute stream after
        this may reuse it); returns the bytes freed."""
        if not self.slots:
            return 0
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        freed = sum(s.numel() for s in self.slots)
        self.slots, self.owner = [], []
        return freed

    def new_event(self):
        return torch.cuda.Event() if self.cuda else DoneEvent()

    def _stamp(self):
        if not self.timeline:
            return None
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            return ev
        return time.perf_counter()

    def copy_in(self, slot: int, src: torch.Tensor, nbytes: int, unit: int, host_event=None) -> None:
        """One H2D copy of ``src[:nbytes]`` into the slot, ordered after the slot's last consumer."""
        dst = self.slots[slot][:nbytes]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[slot])
                t0 = self._stamp()
                if t0 is not None:
                    t0.record(self.copy_stream)
                dst.copy_(src[:nbytes], non_blocking=True)
                self.ready[slot].record(self.copy_stream)
                if host_event is not None:
                    host_event.record(self.copy_stream)
                if t0 is not None:
                    t1 = self._stamp()
                    t1.record(self.copy_stream)
                    self.events.append(("copy", unit, t0, t1))
        else:
            t0 = self._stamp()
            dst.copy_(src[:nbytes])
            if t0 is not None:
                self.events.append(("copy", unit, t0, self._stamp()))
        self.owner[slot] = unit
        self.bytes_copied += nbytes

    def wait_ready(self, slot: int) -> None:
        """Make the compute (current) stream wait for the slot's copy; never blocks the CPU."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def pace(self, pos: int) -> None:
        """Before queueing position ``pos``, sleep until position ``pos - pace_units`` has run on the GPU.

        Without this the CPU races ahead until the driver's launch queue is full and then spins there: a whole core
        burnt for the length of the run. The GPU still has ``pace_units`` units of work queued, so it never idles.
        """
        if self.paced:
            i = pos % len(self.paced)
            if self._pace_recorded[i]:
                self.paced[i].synchronize()

    def release(self, slot: int, pos: int | None = None) -> None:
        """Mark the slot free once the work queued so far on the compute stream has run."""
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            self.free[slot].record(stream)
            if self.paced and pos is not None:
                i = pos % len(self.paced)
                self.paced[i].record(stream)
                self._pace_recorded[i] = True

    @contextlib.contextmanager
    def compute_span(self, unit: int):
        """Timeline stamps around one unit's compute (no-op unless the timeline is on)."""
        t0 = self._stamp()
        if self.cuda and t0 is not None:
            t0.record()
        try:
            yield
        finally:
            if t0 is not None:
                t1 = self._stamp()
                if self.cuda:
                    t1.record()
                self.events.append(("compute", unit, t0, t1))

    def timeline_ms(self) -> list[dict]:
        """Per event: kind, unit, start and end in ms from the first stamp. Synchronizes (call after the run)."""
        if not self.events:
            return []
        if self.cuda:
            torch.cuda.synchronize(self.device)
            first = self.events[0][2]
            rows = [(k, u, first.elapsed_time(a), first.elapsed_time(b)) for k, u, a, b in self.events]
        else:
            first = self.events[0][2]
            rows = [(k, u, (a - first) * 1e3, (b - first) * 1e3) for k, u, a, b in self.events]
        base = min(r[2] for r in rows)
        return [{"kind": k, "unit": u, "start_ms": a - base, "end_ms": b - base} for k, u, a, b in rows]

    def close(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.slots.clear()
        self.owner.clear()
