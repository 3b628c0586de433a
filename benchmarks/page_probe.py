"""Ways to bring page-cached shard bytes to the GPU, measured side by side (GPU, Linux).

Each variant maps (or reads) the same warm page-cache bytes afresh and makes them ready for an asynchronous copy to
the GPU; the table gives wall rate and the CPU seconds the whole process spent, since both bound a warm run:
  populate+register  MADV_POPULATE_READ on a fresh mapping, then cudaHostRegister(READ_ONLY) (mapped mode today)
  register           cudaHostRegister on a fresh, unfaulted mapping: the driver's pinning faults the pages itself
  map_populate       mmap(MAP_POPULATE), then cudaHostRegister
  pread->pinned      positioned reads into a page-locked buffer (a copy out of the page cache)
each with 1 and N threads (one shard per task). Usage: python benchmarks/page_probe.py SHARD... [--threads 8]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

MADV_POPULATE_READ = 22
REGISTER_FLAGS = 0x01 | 0x08  # PORTABLE | READ_ONLY
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_READ, MAP_SHARED, MAP_POPULATE = 0x1, 0x01, 0x8000


def _map(fd: int, size: int, populate: bool) -> int:
    addr = LIBC.mmap(None, size, PROT_READ, MAP_SHARED | (MAP_POPULATE if populate else 0), fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return addr


def _register(addr: int, size: int) -> None:
    err = int(torch.cuda.cudart().cudaHostRegister(addr, (size + 4095) // 4096 * 4096, REGISTER_FLAGS))
    if err:
        raise RuntimeError(f"cudaHostRegister error {err}")


def _unregister(addr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(addr)


def map_shard(variant: str, path: Path) -> tuple:
    """Map one shard afresh and page-lock it, faulting it in the way ``variant`` says."""
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    try:
        addr = _map(fd, size, populate=variant == "map_populate")
        if variant == "populate+register" and LIBC.madvise(addr, size, MADV_POPULATE_READ) != 0:
            raise OSError(ctypes.get_errno(), "MADV_POPULATE_READ failed")
        _register(addr, size)
        return ("map", addr, fd, size)
    except BaseException:
        os.close(fd)
        raise


def run_variant(variant: str, shards: list[Path], threads: int, pinned: list[torch.Tensor]) -> dict:
    """Bring every shard in with ``threads`` tasks; wall rate and process CPU for that alone; then one H2D pass."""
    total = sum(p.stat().st_size for p in shards)
    cpu0, t0 = time.process_time(), time.perf_counter()

    def task(i: int):
        path = shards[i]
        if variant == "pread->pinned":
            buf = pinned[i]
            fd = os.open(path, os.O_RDONLY)
            mv, done, size = memoryview(buf.numpy()), 0, os.fstat(fd).st_size
            while done < size:
                n = os.preadv(fd, [mv[done : min(size, done + (64 << 20))]], done)
                if n <= 0:
                    break
                done += n
            os.close(fd)
            return ("buf", buf, None, size)
        return map_shard(variant, path)

    with ThreadPoolExecutor(threads) as pool:
        held = list(pool.map(task, range(len(shards))))
    ready_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    dst = torch.empty(max(h[3] for h in held), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for kind, obj, _, size in held:
        src = obj if kind == "buf" else torch.frombuffer((ctypes.c_uint8 * size).from_address(obj), dtype=torch.uint8)
        dst[:size].copy_(src[:size], non_blocking=True)
    torch.cuda.synchronize()
    h2d_s = time.perf_counter() - t
    t = time.perf_counter()
    for kind, obj, fd, size in held:
        if kind == "map":
            _unregister(obj)
            LIBC.munmap(obj, size)
            os.close(fd)
    release_s = time.perf_counter() - t
    gb = total / 1e9
    return {"variant": variant, "threads": threads, "gb": round(gb, 2), "ready_gbps": round(gb / ready_s, 2),
            "cpu_s": round(cpu_s, 2), "cpu_s_per_gb": round(cpu_s / gb, 3), "h2d_gbps": round(gb / h2d_s, 1),
            "release_s": round(release_s, 3)}  # fmt: skip


def system_facts(path: Path) -> dict:
    facts = {"kernel": platform.release()}
    for key, f in {"thp": "/sys/kernel/mm/transparent_hugepage/enabled",
                   "thp_shmem": "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
                   "fault_around_bytes": "/sys/kernel/debug/fault_around_bytes"}.items():  # fmt: skip
        with contextlib.suppress(OSError):
            facts[key] = Path(f).read_text().strip()
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fs = line.split()[:3]
            if str(path.resolve()).startswith(mnt) and len(mnt) >= len(facts.get("mount", "")):
                facts.update(mount=mnt, fs=fs, dev=dev)
    except OSError:
        pass
    return facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shards", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    torch.zeros(1, device="cuda")
    for p in args.shards:  # warm the page cache
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    facts = system_facts(args.shards[0])
    pinned = []
    for p in args.shards:
        buf = torch.empty(p.stat().st_size, dtype=torch.uint8)
        _register(buf.data_ptr(), buf.numel())
        pinned.append(buf)
    rows = []
    for variant in ("populate+register", "register", "map_populate", "pread->pinned"):
        for threads in (1, args.threads):
            try:
                rows.append(run_variant(variant, args.shards, threads, pinned))
            except Exception as exc:  # noqa: BLE001 - a refused variant is a result too
                rows.append({"variant": variant, "threads": threads, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"facts": facts, "rows": rows}))


if __name__ == "__main__":
    main()
