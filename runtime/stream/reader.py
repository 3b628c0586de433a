"""Disk workers: aligned positioned reads of unit byte ranges into host buffers, O_DIRECT or through the page cache.

One file descriptor per shard, opened once and shared by every worker (pread needs no seek, so it is thread safe).
A request (one unit into one buffer) is cut into aligned chunks that N worker threads read in parallel, which keeps
several reads in flight on an NVMe drive. Two read modes, chosen per shard by the caller (the planner decides):
  direct  O_DIRECT: the drive every time, nothing left in the page cache. For packs larger than the RAM budget, where
          cached pages would only evict everything else. Where O_DIRECT is refused (tmpfs, some network filesystems)
          the shard is read buffered and each chunk is dropped from the page cache right after (DONTNEED).
  cached  buffered reads that leave the pages cached, so the next run (or the next job) reads RAM, not the drive.
Requests carry a priority (lower first): the encoder that is needed now reads before the DiT blocks prefetched for
later. Failures never kill a worker silently: they are stored on the request and raised in the thread that waits for
it, naming the shard.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import hashlib
import itertools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from wanpack.errors import VerificationError, WanpackError
from wanpack.manifests.pack_files import open_regular

ALIGN = 4096
DEFAULT_CHUNK = 16 << 20


class ShardReadError(WanpackError):
    """A shard could not be read (I/O error, short read, stalled disk)."""


class ChecksumError(VerificationError):
    """A shard's bytes do not hash to the manifest's sha256."""


HUGE_PAGE = 2 << 20
ALLOCATE_AHEAD = 2  # request buffers the reader's allocator makes before the workers reach them


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A 1-D uint8 CPU tensor of ``nbytes`` whose first byte is 4096-aligned (O_DIRECT needs aligned buffers).

    Buffers of a huge page or more are aligned to 2 MiB and advised as huge pages: a 14 GB host cache then costs
    thousands of page faults (and pinning work) instead of millions.
    """
    nbytes = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
    align = HUGE_PAGE if nbytes >= HUGE_PAGE else ALIGN
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    skip = (-raw.data_ptr()) % align
    buf = raw[skip : skip + nbytes]
    if align == HUGE_PAGE:
        _advise_huge(buf.data_ptr(), nbytes // HUGE_PAGE * HUGE_PAGE)
    return buf


MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault writable pages in (the kernel zero-fills them) without touching them


def prefault(buf: torch.Tensor) -> bool:
    """Fault a fresh buffer's pages in before it is page-locked, so the kernel's zero-filling happens here and not
    inside cudaHostRegister, which holds a driver lock that other threads' CUDA calls wait on. Best effort: False
    where the kernel lacks it (the registration then faults the pages in itself)."""
    return buf.numel() > 0 and _madvise(buf.data_ptr(), buf.numel(), MADV_POPULATE_WRITE) == 0


def _advise_huge(ptr: int, nbytes: int) -> None:
    """madvise(MADV_HUGEPAGE) where the platform has it; silently nothing elsewhere (it is only a hint)."""
    if nbytes:
        _madvise(ptr, nbytes, 14)  # MADV_HUGEPAGE


def _madvise(ptr: int, nbytes: int, advice: int) -> int | None:
    """libc madvise's return code (errno via ctypes.get_errno), or None where the platform has no madvise."""
    advise = getattr(_libc(), "madvise", None)
    return None if advise is None else advise(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), advice)


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


@dataclass
class ShardFile:
    """An open shard: fd, whether it is read with O_DIRECT, its real size, and whether buffered reads keep pages."""

    path: Path
    fd: int
    direct: bool
    size: int
    keep_cache: bool = False  # buffered by choice (read mode "cached"): leave the pages in the page cache
    map_base: int = 0  # address of a read-only mapping of the whole shard (mapped mode), else 0

    @property
    def mode(self) -> str:
        return "direct" if self.direct else ("cached" if self.keep_cache else "buffered-dropped")


def _refuse_irregular(path: Path) -> None:
    """A FIFO, device or folder named as a shard is refused before the real open, which for a FIFO would block
    forever: probed with O_NONBLOCK + fstat (manifests/pack_files.py). PackComponent.path() already keeps the path
    inside the pack."""
    os.close(open_regular(path))


def open_shard(path: Path, expected_size: int | None, direct: bool = True) -> ShardFile:
    """Open for O_DIRECT when asked and the filesystem allows it (probed with one aligned read), else buffered.

    Buffered by choice (``direct=False``) keeps the page cache; buffered because O_DIRECT was refused drops it.
    """
    _refuse_irregular(path)
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    fd = -1
    use_direct = direct and hasattr(os, "O_DIRECT")
    try:
        if use_direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT)
                probe = aligned_empty(ALIGN)
                os.preadv(fd, [memoryview(probe.numpy())], 0)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                if fd >= 0:
                    os.close(fd)
                fd, use_direct = -1, False
        if fd < 0:
            fd = os.open(path, flags)
        size = os.fstat(fd).st_size
    except OSError as exc:
        if fd >= 0:
            os.close(fd)
        raise ShardReadError(f"{path}: cannot open shard ({exc.strerror}) - the pack is incomplete or unreadable; "
                             "check the path or convert again") from None  # fmt: skip
    if expected_size is not None and size != expected_size:
        os.close(fd)
        raise ShardReadError(f"{path}: shard is {size} bytes but the manifest says {expected_size} - the file is "
                             "truncated or replaced; convert again")  # fmt: skip
    return ShardFile(path, fd, use_direct, size, keep_cache=not direct)


class ReadRequest:
    """One range of one shard into one buffer; completed (or failed) by whichever worker reads its last chunk."""

    def __init__(self, shard: ShardFile, offset: int, dest: torch.Tensor | None, expected: int, what: str,
                 pre_event=None, verify: tuple[bytes, str] | None = None, priority: int = 0,
                 make_dest: Callable[[], torch.Tensor] | None = None, populate: bool = False,
                 finish: Callable[[], None] | None = None):  # fmt: skip
        if dest is None and make_dest is None:
            raise ValueError("a read needs a destination buffer or a way to make one")
        self.shard, self.offset, self.expected, self.what = shard, offset, expected, what
        self.populate = populate  # dest is a mapping of this very range: fault its pages in, copy nothing
        self.finish = finish  # run by the worker that completes the request (e.g. pin the mapped range)
        self._dest = dest
        self._make_dest = make_dest  # allocate (and pin) in the first worker, off the thread that submits
        self.pre_event = pre_event  # host buffer's last H2D copy; must finish before we overwrite the buffer
        self.verify = verify  # (shard prefix bytes, expected sha256) when this read completes the shard
        self.priority = priority
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._got = 0
        self.started = self.finished = 0.0

    @property
    def dest(self) -> torch.Tensor:
        """The buffer the bytes land in; made on first use when the request was given a factory."""
        if self._dest is None:
            self.make_dest_now()
        return self._dest

    @property
    def needs_dest(self) -> bool:
        """Whether the buffer is still to be made (by the reader's allocator or the first worker to need it)."""
        return self._dest is None and self._make_dest is not None

    def make_dest_now(self) -> bool:
        """Make the buffer unless it exists; returns whether this call made it."""
        with self._lock:
            if self._dest is not None:
                return False
            self._dest = self._make_dest()
            return True

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc

    def _chunk_done(self, nbytes: int) -> bool:
        with self._lock:
            self._got += nbytes
            self._pending -= 1
            return self._pending == 0

    def _complete(self) -> None:
        if self.error is None and self._got != self.expected:
            self.error = ShardReadError(f"{self.shard.path}: short read of {self.what} ({self._got} of {self.expected}"
                                        " bytes) - the shard is truncated; convert the pack again")  # fmt: skip
        if self.error is None and self.finish is not None:
            try:
                self.finish()
            except BaseException as exc:  # noqa: BLE001 - raised in the waiting thread
                self.error = exc
        if self.error is None and self.verify is not None:
            prefix, want = self.verify
            h = hashlib.sha256(prefix)
            h.update(memoryview(self.dest[: self.expected].numpy()))
            if h.hexdigest() != want:
                self.error = ChecksumError(f"{self.shard.path}: sha256 does not match the manifest - the shard is "
                                           "corrupt; run `wanpack verify` and convert again")  # fmt: skip
        self.finished = time.perf_counter()
        self.done.set()

    def wait(self, timeout_s: float, alive=lambda: True) -> None:
        """Block until read (raising its error here, in the caller's thread) or until ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not self.done.wait(0.05):
            if not alive():
                raise ShardReadError(f"{self.shard.path}: the disk workers stopped while reading {self.what} - "
                                     "see the error above; run again")  # fmt: skip
            if time.monotonic() > deadline:
                raise ShardReadError(f"{self.shard.path}: reading {self.what} took longer than {timeout_s:.0f} s - "
                                     "the disk is stalled or far too slow; check the drive or raise --read-timeout")  # fmt: skip
        if self.error is not None:
            raise self.error


class DiskReader:
    """N worker threads serving :class:`ReadRequest` chunks from one shared priority queue (lower first, then FIFO).

    One reader may serve several engines (the encoders and the DiT of one run share it), so the drive works on
    whatever is needed soonest and never on two components' reads competing as equals.
    """

    def __init__(self, workers: int = 4, chunk_bytes: int = DEFAULT_CHUNK, delay_s: float = 0.0,
                 allocate_ahead: int = ALLOCATE_AHEAD):  # fmt: skip
        if workers < 1:
            raise ValueError("need at least one disk worker")
        self.chunk_bytes = max(ALIGN, chunk_bytes // ALIGN * ALIGN)
        self.delay_s = delay_s  # tests: a deliberately slow disk
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"wanpack-disk-{i}", daemon=True)
                         for i in range(workers)]  # fmt: skip
        self._to_allocate: queue.PriorityQueue = queue.PriorityQueue()
        self._ahead_limit = max(1, allocate_ahead)
        self._allocator = threading.Thread(target=self._allocate_ahead, name="wanpack-alloc", daemon=True)
        self.bytes_read = 0
        self.busy_s = 0.0
        self.allocated_ahead = 0  # requests whose buffer the allocator made before a worker needed it
        self._stat_lock = threading.Lock()
        for t in (*self._threads, self._allocator):
            t.start()

    @property
    def workers(self) -> int:
        return len(self._threads)

    def alive(self) -> bool:
        return not self._stop.is_set() and all(t.is_alive() for t in self._threads)

    def submit(self, req: ReadRequest) -> ReadRequest:
        """Queue a request's chunks; returns at once."""
        if self._stop.is_set():
            raise ShardReadError(f"{req.shard.path}: the disk reader is closed - open a new stream")
        length = (req.expected + ALIGN - 1) // ALIGN * ALIGN
        starts = list(range(0, max(length, 1), self.chunk_bytes))
        req._pending = len(starts)
        req.started = time.perf_counter()
        if req.needs_dest:
            self._to_allocate.put((req.priority, next(self._seq), req))
        for s in starts:
            self._queue.put((req.priority, next(self._seq), (req, s, min(self.chunk_bytes, length - s))))
        return req

    def _allocate_ahead(self) -> None:
        """Make the buffers of queued requests (in the order the workers will reach them) before a worker needs one.

        A worker that meets a request without its buffer makes it, and every worker on that request waits: for a
        350 MB pinned cache buffer that is the kernel zero-filling and the driver locking every page, time in which
        the drive sat idle (a direct-read run's first step read at about 1.4 of the drive's 2 GB/s). It stays at most
        ``allocate_ahead`` unfinished requests ahead: pinning holds a driver lock that stalls other threads' CUDA
        calls, and making all 38 buffers of a 16 GiB plan at once, during the text phase, slowed the T5 forward from
        2.0 to 5.1 s on an H200. A failure here is left for the worker, which meets it again and reports it on the
        request.
        """
        name_thread("wanpack-alloc")
        made: collections.deque[ReadRequest] = collections.deque()  # made here, not yet read
        while True:
            while made and made[0].done.is_set():
                made.popleft()
            if len(made) >= self._ahead_limit:
                made[0].done.wait(0.05)  # (also sees close(): the loop ends at the sentinel)
                if not self._stop.is_set():
                    continue
            req = self._to_allocate.get()[2]
            if req is None:
                return
            if req.error is not None or self._stop.is_set() or not req.needs_dest:
                continue
            try:
                made_now = req.make_dest_now()
            except BaseException:  # noqa: BLE001 - the worker that needs the buffer raises it on the request
                continue
            if made_now:
                made.append(req)
                with self._stat_lock:
                    self.allocated_ahead += 1

    def _work(self) -> None:
        name_thread("wanpack-disk")
        while True:
            item = self._queue.get()[2]
            if item is None:
                return
            req, start, length = item
            nbytes = 0
            try:
                if req.error is None and not self._stop.is_set():
                    if req.pre_event is not None:
                        req.pre_event.synchronize()
                    nbytes = self._read(req, start, length)
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the waiting thread
                req._fail(exc if isinstance(exc, WanpackError) else ShardReadError(
                    f"{req.shard.path}: read error in {req.what} ({exc}) - the drive or file is failing; "
                    "check it and run again"))  # fmt: skip
            if req._chunk_done(nbytes):
                try:
                    req._complete()
                except BaseException as exc:  # noqa: BLE001
                    req.error = ShardReadError(f"{req.shard.path}: could not check {req.what} ({exc})")
                    req.done.set()

    def _read(self, req: ReadRequest, start: int, length: int) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)
        t0 = time.perf_counter()
        sf = req.shard
        want = max(0, min(length, req.expected - start))
        done = populate_range(req.dest, start, want, sf) if req.populate else self._pread(req, start, length, want)
        with self._stat_lock:
            self.bytes_read += done
            self.busy_s += time.perf_counter() - t0
        return min(done, want)

    @staticmethod
    def _pread(req: ReadRequest, start: int, length: int, want: int) -> int:
        """Positioned reads of one chunk into the request's buffer; the page cache dropped behind buffered ones."""
        sf = req.shard
        view = memoryview(req.dest[start : start + length].numpy())
        if not sf.direct:
            view = view[:want]
        done = 0
        while done < want:
            n = os.preadv(sf.fd, [view[done:]], req.offset + start + done)
            if n <= 0:
                break
            done += n
        if not sf.direct and not sf.keep_cache and want:
            os.posix_fadvise(sf.fd, req.offset + start, want, os.POSIX_FADV_DONTNEED)
        return done

    def close(self) -> None:
        """Stop the workers (chunks still queued are dropped); in-flight preads finish first."""
        if self._stop.is_set():
            return
        self._stop.set()
        for _ in self._threads:
            self._queue.put((float("inf"), next(self._seq), None))  # after the queued chunks, which now complete unread
        self._to_allocate.put((float("inf"), next(self._seq), None))
        deadline = time.monotonic() + 10.0  # a stalled pread cannot be cancelled; daemon threads die with the process
        for t in (*self._threads, self._allocator):
            t.join(timeout=max(0.0, deadline - time.monotonic()))


def sha256_file(shard: ShardFile, reader_chunk: int = 16 << 20) -> str:
    """Hash a whole shard through an aligned buffer (O_DIRECT-safe), dropping pages behind us when buffered."""
    h = hashlib.sha256()
    buf = aligned_empty(reader_chunk)
    view = memoryview(buf.numpy())
    pos = 0
    while pos < shard.size:
        n = os.preadv(shard.fd, [view], pos)
        if n <= 0:
            raise ShardReadError(f"{shard.path}: short read while hashing - the shard is truncated; convert again")
        h.update(view[: min(n, shard.size - pos)])
        if not shard.direct and not shard.keep_cache:
            os.posix_fadvise(shard.fd, pos, n, os.POSIX_FADV_DONTNEED)
        pos += n
    return h.hexdigest()


def name_thread(name: str) -> None:
    """Give the OS thread a name (Linux prctl PR_SET_NAME), so per-thread CPU in /proc and the sidecar says whose."""
    libc = _libc()
    if libc is not None and hasattr(libc, "prctl"):
        libc.prctl(15, name.encode()[:15], 0, 0, 0)


MADV_POPULATE_READ = 22  # Linux 5.14+: fault pages of a mapping in (reading the file), no copy to user space
_SCRATCH = threading.local()


def populate_range(view: torch.Tensor, start: int, nbytes: int, shard: ShardFile) -> int:
    """Bring ``view[start:start+nbytes]`` (a read-only mapping of ``shard``) into memory; returns the bytes covered.

    MADV_POPULATE_READ faults the pages in from the page cache (or the drive) without copying anything to user space;
    where the kernel lacks it, a positioned read into a small per-thread scratch buffer does the same job with a copy.
    """
    if nbytes <= 0:
        return 0
    rc = None
    if getattr(_SCRATCH, "madvise_ok", True):
        rc = _madvise(view.data_ptr() + start, nbytes, MADV_POPULATE_READ)
    if rc is not None:
        if rc == 0:
            return nbytes
        err = ctypes.get_errno()
        if err != errno.EINVAL:
            raise ShardReadError(f"{shard.path}: could not read {nbytes} bytes at {start} ({os.strerror(err)}) - the "
                                 "shard is truncated or the drive is failing; convert again")  # fmt: skip
        _SCRATCH.madvise_ok = False
    scratch = getattr(_SCRATCH, "buf", None)
    if scratch is None:
        scratch = _SCRATCH.buf = aligned_empty(DEFAULT_CHUNK)
    mv = memoryview(scratch.numpy())
    offset = view.data_ptr() - shard.map_base + start if shard.map_base else start
    done = 0
    while done < nbytes:
        n = os.preadv(shard.fd, [mv[: min(len(mv), nbytes - done)]], offset + done)
        if n <= 0:
            break
        done += n
    return done
