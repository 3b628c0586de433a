"""ShardMaps' page locking: once per range, a refusal remembered (later ranges stay pageable), every locked range
unlocked at close. The CUDA runtime is replaced by a recorder, so this runs on CPU."""

from __future__ import annotations

import threading

import pytest
import torch

from wanpack.runtime.stream.host import ShardMaps

UNIT = 3 * 4096


class FakeCudart:
    def __init__(self, fail: bool = False):
        self.fail = fail
        self.registered: list[int] = []
        self.unregistered: list[int] = []
        self._lock = threading.Lock()

    def cudaHostRegister(self, ptr, nbytes, flags):  # noqa: N802 - the CUDA runtime's name
        with self._lock:
            self.registered.append(ptr)
        return 1 if self.fail else 0

    def cudaHostUnregister(self, ptr):  # noqa: N802
        with self._lock:
            self.unregistered.append(ptr)
        return 0


@pytest.fixture
def mapped(tmp_path, monkeypatch):
    def make(fail=False, units=4):
        fake = FakeCudart(fail)
        monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
        path = tmp_path / "shard.bin"
        path.write_bytes(bytes(range(256)) * (UNIT * units // 256))
        fd = open(path, "rb")  # noqa: SIM115 - closed by the fixture's finalizer
        maps = ShardMaps(pin=True)
        maps.base(path, fd.fileno(), UNIT * units)
        views = [maps.view(path, i * UNIT, UNIT) for i in range(units)]
        made.append((maps, fd.close))
        return maps, views, fake

    made: list = []
    yield make
    for maps, close_file in made:
        maps.close()
        close_file()


def test_each_range_is_locked_once_and_unlocked_at_close(mapped):
    maps, views, fake = mapped()
    for v in views:
        maps.register(v)
    maps.register(views[1])  # locked already: nothing more
    assert fake.registered == [v.data_ptr() for v in views]
    assert maps.registered_bytes == len(views) * UNIT
    maps.close()
    assert sorted(fake.unregistered) == sorted(v.data_ptr() for v in views)
    assert maps.registered_bytes == 0


def test_a_refusal_is_remembered_and_stops_locking(mapped):
    maps, views, fake = mapped(fail=True)
    maps.register(views[0])
    assert maps.register_error and "cudaHostRegister" in maps.register_error
    maps.register(views[1])
    assert len(fake.registered) == 1 and maps.registered_bytes == 0
