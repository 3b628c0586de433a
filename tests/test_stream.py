"""Streaming engine on the CPU path: streamed == resident bit-exactly, slot safety, errors surface by shard name.

The resident reference reads every tensor with the safetensors library (an independent reader of the same files),
so a wrong offset, a slot overwritten too early or a stale cache entry changes the output bits.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from stream_packs import make_pack

from wanpack.runtime.ops.linear import linear
from wanpack.runtime.pack import PackComponent, block_relative
from wanpack.runtime.stream.engine import StreamEngine, StreamOptions
from wanpack.runtime.stream.reader import ChecksumError, ShardReadError

TOKENS, DIM = 5, 64


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream_packs")
    return {
        "by_block": make_pack(root / "bb", layers=3, quant="int8", layout="by_block"),
        "single": make_pack(root / "single", layers=3, quant="fp8", layout="single"),
        "bf16": make_pack(root / "bf16", layers=2, quant="none", layout="by_block"),
    }


def phase_fn(phase: str, w, x: torch.Tensor) -> torch.Tensor:
    """A toy phase that depends on every byte of every tensor it gets (bit-exact comparisons catch any mix-up)."""
    keys = sorted(k for k in w if k.startswith(phase) or (phase == "self_attn" and k == "modulation")
                  or (phase == "cross_attn" and k.startswith("norm3")))  # fmt: skip
    for k in keys:
        t = w[k]
        if k.endswith(".weight") and t.dim() == 2:
            y = linear(x if t.shape[1] == x.shape[-1] else x.repeat(1, t.shape[1] // x.shape[-1]), t,
                       w.get(k.removesuffix(".weight") + ".bias"), w.get(k + "_scale"))  # fmt: skip
            x = x + torch.tanh(y[:, : x.shape[-1]])
        else:
            x = x + 1e-3 * t.float().sum()
    return x


def block_fn(unit, w, x: torch.Tensor) -> torch.Tensor:
    for phase in unit.phases:
        x = phase_fn(phase, w, x)
    return x


def reference(pack_dir: Path, x: torch.Tensor, forwards: int) -> torch.Tensor:
    comp = PackComponent(pack_dir).entry
    per_block: dict[int, dict[str, torch.Tensor]] = {}
    for shard in comp.shards:
        with safe_open(pack_dir / shard.path, framework="pt") as f:
            for t in shard.tensors:
                if t.block is not None:
                    per_block.setdefault(t.block, {})[block_relative(t.name, t.block)] = f.get_tensor(t.name)
    for _ in range(forwards):
        for b in range(comp.num_blocks):
            for phase in ("self_attn", "cross_attn", "ffn"):
                x = phase_fn(phase, per_block[b], x)
    return x


def run_engine(pack_dir: Path, forwards: int = 2, consumer_delay: float = 0.0, **opts) -> tuple[list, dict]:
    torch.manual_seed(0)
    x0 = torch.randn(TOKENS, DIM)
    outs = []
    with StreamEngine(PackComponent(pack_dir), StreamOptions(**opts)) as eng:
        for _ in range(forwards):
            x = x0.clone()
            for unit, w in eng.forward():
                before = {k: v.clone() for k, v in w.items()} if consumer_delay else None
                x = block_fn(unit, w, x)
                if consumer_delay:
                    time.sleep(consumer_delay)
                    assert all(torch.equal(before[k].view(torch.uint8), w[k].view(torch.uint8)) for k in w), (
                        f"slot of {unit.name} was overwritten while its consumer ran")
            outs.append(x)
        stats = eng.stats()
    return outs, stats


GRID = [(g, p, c, n) for g in ("block", "phase") for p in (1, 2, 3) for c in (False, True) for n in (1, 3)]


@pytest.mark.parametrize(("gran", "prefetch", "cache", "workers"), GRID)
def test_streamed_equals_resident(packs, gran, prefetch, cache, workers):
    pack = packs["by_block"]
    ref = reference(pack, torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
    n_units = len(PackComponent(pack).units(gran))
    outs, stats = run_engine(pack, forwards=3, granularity=gran, prefetch=prefetch, device_slots=prefetch + 1,
                             host_slots=2, cache_units=list(range(n_units)) if cache else [], disk_workers=workers,
                             chunk_bytes=8192)  # fmt: skip
    for out in outs:
        assert torch.equal(out, ref)
    assert stats["device_slots"] == prefetch + 1


@pytest.mark.parametrize("layout", ["single", "bf16"])
@pytest.mark.parametrize("gran", ["model", "block", "phase"])
def test_layouts_and_dtypes_bit_exact(packs, layout, gran):
    ref = reference(packs[layout], torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
    outs, _ = run_engine(packs[layout], forwards=2, granularity=gran, prefetch=1, device_slots=2, disk_workers=2,
                         verify=True)  # fmt: skip
    assert all(torch.equal(o, ref) for o in outs)


def test_model_granularity_copies_once(packs):
    pack = packs["by_block"]
    block_bytes = sum(u.length for u in PackComponent(pack).units("block"))
    _, stats = run_engine(pack, forwards=3, granularity="model", disk_workers=2)
    assert stats["h2d_bytes"] == block_bytes  # first forward fills the slots; later ones move nothing


def test_host_cache_stops_disk_reads(packs):
    pack = packs["by_block"]
    comp = PackComponent(pack)
    units = comp.units("block")
    with StreamEngine(comp, StreamOptions(cache_units=list(range(len(units))), disk_workers=2)) as eng:
        for _ in eng.forward():
            pass
        first = eng.bytes_requested
        for _ in range(2):
            for _ in eng.forward():
                pass
        assert eng.bytes_requested == first
        assert first <= sum(u.length for u in units)
        assert eng.host.slots == []  # everything read straight into the cache: the ring was never allocated


def test_subset_cache_reads_only_uncached(packs):
    comp = PackComponent(packs["by_block"])
    with StreamEngine(comp, StreamOptions(cache_units=[1], disk_workers=2)) as eng:
        for _ in eng.forward():
            pass
        first = eng.bytes_requested  # counted at submit; bytes_read would race with reads still in flight
        for _ in eng.forward():
            pass
        per_step = eng.bytes_requested - first
    sizes = {u.index: min(u.length, os.path.getsize(comp.path(u.shard)) - u.offset) for u in comp.units("block")}
    assert per_step == sizes[0] + sizes[2]


@pytest.mark.parametrize("gran", ["block", "phase"])
def test_slow_reader_and_slow_consumer_never_reuse_a_slot_early(packs, gran):
    pack = packs["by_block"]
    ref = reference(pack, torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
    outs, _ = run_engine(pack, forwards=2, granularity=gran, prefetch=2, device_slots=3, host_slots=2,
                         disk_workers=3, chunk_bytes=4096, read_delay_s=0.002)  # fmt: skip
    assert all(torch.equal(o, ref) for o in outs)
    outs, _ = run_engine(pack, forwards=2, consumer_delay=0.01, granularity=gran, prefetch=2, device_slots=3,
                         host_slots=2, disk_workers=3, chunk_bytes=4096)  # fmt: skip
    assert all(torch.equal(o, ref) for o in outs)


def test_read_waits_are_counted_per_forward(packs):
    """A slow disk shows as main-thread waits in the first forward; once every unit is cached, none."""
    pack = packs["by_block"]
    n_units = len(PackComponent(pack).units("block"))
    _, stats = run_engine(pack, forwards=2, granularity="block", prefetch=1, device_slots=2, host_slots=2,
                          cache_units=list(range(n_units)), disk_workers=1, chunk_bytes=4096, read_delay_s=0.01)  # fmt: skip
    first, second = stats["read_wait_s"]
    assert first > 0.01 * n_units / 2  # at least half of the units' delayed reads were waited for
    assert second == 0.0


def test_limit_forwards_reads_nothing_past_the_last_forward(packs):
    """A job that needs n forwards reads each streamed unit n times, not the next forward's first units as well; a
    forward past the limit still runs (reading as it goes) and gives the same result."""
    pack = packs["by_block"]
    ref = reference(pack, torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
    units = PackComponent(pack).units("block")
    per_forward = sum(u.length for u in units)
    opts = StreamOptions(granularity="block", prefetch=1, device_slots=2, host_slots=3, disk_workers=2)
    with StreamEngine(PackComponent(pack), opts) as eng:
        x = eng.run(torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), block_fn)
        assert eng.bytes_requested > per_forward  # unlimited: it read ahead into a second forward
    with StreamEngine(PackComponent(pack), opts) as eng:
        eng.limit_forwards(2)
        for _ in range(2):
            x = eng.run(torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), block_fn)
            assert torch.equal(x, ref)
        assert eng.bytes_requested == 2 * per_forward
        x = eng.run(torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), block_fn)
        assert torch.equal(x, ref) and eng.bytes_requested >= 3 * per_forward
    with StreamEngine(PackComponent(pack), opts) as eng:  # a kept engine's next job: prefetch_cache reads ahead again
        eng.limit_forwards(1)
        eng.run(torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), block_fn)
        assert eng.bytes_requested == per_forward
        eng.prefetch_cache()
        assert eng.bytes_requested > per_forward
        eng.limit_forwards(1)
        x = eng.run(torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), block_fn)
        assert torch.equal(x, ref) and eng.bytes_requested == 2 * per_forward


def test_failing_reader_raises_in_bounded_time_naming_shard(tmp_path):
    pack = make_pack(tmp_path / "p", layers=3)
    with StreamEngine(PackComponent(pack), StreamOptions(disk_workers=2, host_slots=1)) as eng:
        os.truncate(pack / "dit" / "block_2.safetensors", 5000)  # the drive "loses" the file under us
        t0 = time.monotonic()
        with pytest.raises(ShardReadError, match=r"block_2\.safetensors.*short read"):
            for _ in eng.forward():
                pass
        assert time.monotonic() - t0 < 5


def test_stalled_disk_times_out(tmp_path):
    pack = make_pack(tmp_path / "p", layers=2)
    opts = StreamOptions(disk_workers=1, chunk_bytes=4096, read_delay_s=0.5, read_timeout_s=0.3)
    with StreamEngine(PackComponent(pack), opts) as eng:
        t0 = time.monotonic()
        with pytest.raises(ShardReadError, match=r"block_0\.safetensors.*took longer"):
            for _ in eng.forward():
                pass
        assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("gran", ["block", "phase"])
def test_corrupt_shard_reported_by_name(tmp_path, gran):
    pack = make_pack(tmp_path / "p", layers=3)
    path = pack / "dit" / "block_1.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    opts = StreamOptions(granularity=gran, verify=True, disk_workers=2)
    with pytest.raises(ChecksumError, match=r"block_1\.safetensors"), StreamEngine(PackComponent(pack), opts) as eng:
        for _ in eng.forward():
            pass


def test_truncated_shard_refused_at_open(tmp_path):
    pack = make_pack(tmp_path / "p", layers=2)
    os.truncate(pack / "dit" / "block_1.safetensors", 4096)
    with pytest.raises(ShardReadError, match=r"block_1\.safetensors.*manifest says"):
        StreamEngine(PackComponent(pack), StreamOptions())


def test_interrupt_stops_workers_and_frees_buffers(packs):
    eng = StreamEngine(PackComponent(packs["by_block"]), StreamOptions(disk_workers=3, host_slots=3))
    threads = list(eng.reader._threads)
    with pytest.raises(KeyboardInterrupt), eng:
        for unit, _ in eng.forward():
            if unit.block == 1:
                raise KeyboardInterrupt
    assert not any(t.is_alive() for t in threads)
    assert eng.host.slots == [] and eng.host.cache == {} and eng.files == {}
    assert not any(t.name.startswith(("wanpack-disk", "wanpack-alloc")) for t in threading.enumerate())


def test_break_mid_forward_then_continue(packs):
    pack = packs["by_block"]
    ref = reference(pack, torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
    with StreamEngine(PackComponent(pack), StreamOptions(granularity="phase", prefetch=2, device_slots=3)) as eng:
        for unit, _ in eng.forward():
            if unit.block == 1:
                break
        x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0))
        assert torch.equal(eng.run(x, block_fn), ref)


def test_buffered_fallback_when_o_direct_is_refused(packs, monkeypatch):
    """Filesystems that refuse O_DIRECT (older tmpfs, some network mounts) answer EINVAL at open: read buffered."""
    import errno

    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    pack = packs["by_block"]
    ref = reference(pack, torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
    outs, stats = run_engine(pack, forwards=2, disk_workers=2, verify=True)
    assert all(torch.equal(o, ref) for o in outs)
    assert not any(stats["direct_io"].values())


def test_tmpfs_pack_streams(packs):
    import tempfile

    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        pack = make_pack(Path(d) / "p", layers=2)
        ref = reference(pack, torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
        outs, _ = run_engine(pack, forwards=2, disk_workers=2)
        assert all(torch.equal(o, ref) for o in outs)


def test_prefetch_needs_slots(packs):
    from wanpack.errors import UsageError

    with pytest.raises(UsageError, match="prefetch"):
        StreamEngine(PackComponent(packs["by_block"]), StreamOptions(prefetch=2, device_slots=2))


@pytest.mark.parametrize("layout", ["by_block", "single", "bf16"])
@pytest.mark.parametrize("gran", ["model", "block", "phase"])
def test_mapped_mode_is_bit_exact_and_copies_nothing_on_the_host(packs, layout, gran):
    """Mapped mode hands out views of the page cache itself: same bits as the reference, every unit mapped once."""
    pack = packs[layout]
    ref = reference(pack, torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
    outs, stats = run_engine(pack, forwards=3, granularity=gran, prefetch=1, device_slots=2, disk_workers=3,
                             chunk_bytes=8192, mapped=True)  # fmt: skip
    assert all(torch.equal(o, ref) for o in outs)
    assert stats["mapped"] and stats["host_slots"] == 0 and stats["pinned_bytes"] == 0  # no ring, nothing pinned (CPU)
    units = PackComponent(pack).units(gran)
    assert stats["requested_bytes"] == sum(u.length for u in units)  # each unit faulted in once, not once per forward


def test_shared_reader_serves_two_engines_and_prefetch_fills_the_cache_first(packs):
    """Two engines on one DiskReader (what a run's encoders and DiT do); prefetch_cache queues every cached unit."""
    from wanpack.runtime.stream.reader import DiskReader

    pack = packs["by_block"]
    comp = PackComponent(pack)
    n = len(comp.units("block"))
    ref = reference(pack, torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
    reader = DiskReader(3, chunk_bytes=8192)
    try:
        cached = StreamEngine(comp, StreamOptions(cache_units=list(range(n)), priority=2), reader=reader)
        mapped = StreamEngine(comp, StreamOptions(mapped=True, priority=0), reader=reader)
        with cached, mapped:
            assert cached.prefetch_cache() == comp.block_bytes()  # all of it queued before the first forward
            for eng in (mapped, cached):
                x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0))
                for unit, w in eng.forward():
                    x = block_fn(unit, w, x)
                assert torch.equal(x, ref)
            assert cached.bytes_requested == comp.block_bytes()  # the forward found everything already requested
        assert reader.alive()  # engines closing does not stop a reader they share
    finally:
        reader.close()


@pytest.mark.parametrize("opts", [{"mapped": True}, {"cache_units": [0, 1, 2]}, {}], ids=["mapped", "cached", "ring"])
@pytest.mark.parametrize("gran", ["block", "phase"])
def test_slots_given_back_between_forwards_come_back_and_copy_anew(packs, gran, opts):
    """release_device frees the GPU slots for another stage (a session's decode); the next forward takes them again,
    copies every unit anew and computes the same bits, whatever was arranged ahead for it before the release."""
    pack = packs["by_block"]
    ref = reference(pack, torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0)), 1)
    units = PackComponent(pack).units(gran)
    with StreamEngine(PackComponent(pack), StreamOptions(granularity=gran, prefetch=1, device_slots=2, host_slots=2,
                                                         disk_workers=2, chunk_bytes=8192, **opts)) as eng:  # fmt: skip
        slot_bytes = sum(s.numel() for s in eng.dev.slots)
        released = False
        for release in (False, True, True, False):
            before = eng.stats()["h2d_bytes"]
            x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(0))
            for unit, w in eng.forward():
                x = block_fn(unit, w, x)
            assert torch.equal(x, ref)
            if released:  # nothing copied ahead survived the release: this forward copied every one of its units
                assert eng.stats()["h2d_bytes"] - before >= sum(u.length for u in units)
            released = release
            if release:
                assert eng.release_device() == slot_bytes and not eng.dev.holding
                assert eng.release_device() == 0  # nothing left to give
        assert eng.dev.holding


def test_a_resident_model_keeps_its_slots(packs):
    """With every unit in its own slot, giving the slots back would mean copying the whole model again: refused."""
    with StreamEngine(PackComponent(packs["by_block"]), StreamOptions(granularity="model")) as eng:
        for _unit, _w in eng.forward():
            pass
        assert eng.release_device() == 0 and eng.dev.holding


def read_all_once_queued(reader, shard, gate: threading.Event, into: list, requests) -> None:
    """Submit every request (into ``into``) while ``gate`` holds their buffer factories, then open the gate and wait
    for all of them; the reader and the shard are closed afterwards."""
    try:
        into.extend(reader.submit(r) for r in requests)
        gate.set()
        for r in into:
            r.wait(30)
    finally:
        reader.close()
        os.close(shard.fd)


def test_buffers_are_made_ahead_of_the_workers_in_the_order_they_read(tmp_path):
    """While the workers read one request, the reader's allocator makes the next requests' buffers, most urgent
    first, so no worker (and no drive) waits on an allocation that could have been done beside the reads."""
    from wanpack.runtime.stream.reader import DiskReader, ReadRequest, open_shard

    size = 16 * 4096
    data = os.urandom(4 * size)
    (tmp_path / "data.bin").write_bytes(data)
    shard = open_shard(tmp_path / "data.bin", None, direct=False)
    gate, made = threading.Event(), []

    def factory(tag: int):
        def make() -> torch.Tensor:
            if tag == 0:
                gate.wait(10)  # holds the allocator until every request is queued
            made.append((tag, threading.current_thread().name))
            return torch.empty(size, dtype=torch.uint8)

        return make

    reader = DiskReader(1, chunk_bytes=4096, delay_s=0.05, allocate_ahead=8)  # one slow worker: 0.8 s per request
    reqs: list = []
    read_all_once_queued(reader, shard, gate, reqs, (ReadRequest(shard, i * size, None, size, f"r{i}", priority=p,
                         make_dest=factory(i)) for i, p in ((0, 0), (1, 2), (2, 1), (3, 1))))  # fmt: skip
    assert [m for m in made if m[0]] == [(2, "wanpack-alloc"), (3, "wanpack-alloc"), (1, "wanpack-alloc")]
    assert reader.allocated_ahead >= 3
    for i, r in enumerate(reqs):
        assert bytes(r.dest.numpy()) == data[i * size : (i + 1) * size]


def test_a_buffer_that_cannot_be_made_fails_its_request_by_name(tmp_path):
    """The allocator leaves a failed allocation to the worker, which reports it on the request; the reader lives on."""
    from wanpack.runtime.stream.reader import DiskReader, ReadRequest, open_shard

    (tmp_path / "data.bin").write_bytes(os.urandom(2 * 4096))
    shard = open_shard(tmp_path / "data.bin", None, direct=False)

    def no_memory() -> torch.Tensor:
        raise MemoryError("no room for the host cache")

    reader = DiskReader(2, chunk_bytes=4096)
    try:
        bad = reader.submit(ReadRequest(shard, 0, None, 4096, "block_7", make_dest=no_memory))
        with pytest.raises(ShardReadError, match=r"block_7.*no room for the host cache"):
            bad.wait(10)
        good = reader.submit(ReadRequest(shard, 4096, torch.empty(4096, dtype=torch.uint8), 4096, "block_8"))
        good.wait(10)
        assert reader.alive()
    finally:
        reader.close()
        os.close(shard.fd)


def test_the_allocator_stays_a_bounded_number_of_requests_ahead(tmp_path):
    """Pinning holds a driver lock other threads' CUDA calls wait on, so the allocator makes a buffer only once fewer
    than ``allocate_ahead`` of the ones it made are still unread (never all of a 14 GB host cache at once)."""
    from wanpack.runtime.stream.reader import DiskReader, ReadRequest, open_shard

    size, count, ahead = 4 * 4096, 6, 2
    (tmp_path / "data.bin").write_bytes(os.urandom(count * size))
    shard = open_shard(tmp_path / "data.bin", None, direct=False)
    gate, reqs, finished_before, order = threading.Event(), [], {}, []

    def factory(i: int):
        def make() -> torch.Tensor:
            gate.wait(10)
            finished_before[i] = sum(r.done.is_set() for r in reqs)
            order.append((i, threading.current_thread().name))
            return torch.empty(size, dtype=torch.uint8)

        return make

    reader = DiskReader(1, chunk_bytes=4096, delay_s=0.02, allocate_ahead=ahead)
    read_all_once_queued(reader, shard, gate, reqs, (ReadRequest(shard, i * size, None, size, f"r{i}",
                         make_dest=factory(i)) for i in range(count)))  # fmt: skip
    assert sorted(finished_before) == list(range(count))
    by_allocator = [i for i, thread in order if thread == "wanpack-alloc"]
    assert len(by_allocator) >= count - 1  # the worker made at most the first one itself
    assert all(finished_before[i] >= k - ahead + 1 for k, i in enumerate(by_allocator)), (order, finished_before)


def test_prefault_makes_a_fresh_buffer_resident():
    """The zero-filling of a host buffer happens in prefault, before cudaHostRegister would do it under its lock."""
    import mmap

    from wanpack.runtime.stream.reader import prefault

    def resident_bytes() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if not Path("/proc/self/statm").exists():
        pytest.skip("needs Linux /proc")
    fresh = mmap.mmap(-1, 64 << 20)  # a new anonymous mapping: none of its pages is resident yet (a heap block may be)
    buf = torch.frombuffer(fresh, dtype=torch.uint8)
    before = resident_bytes()
    if not prefault(buf):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE")
    assert resident_bytes() - before >= 60 << 20
    del buf
    fresh.close()
