"""Conversion throughput and memory on a 14B-shaped synthetic source, next to the raw read speed of the same files.

Not a test: prints a table (and --json) to record in docs/PERFORMANCE.md. The source is the full-width T2V-14B layout
in fp32 (as on the hub) with enough blocks to pass --min-gb; each conversion runs in its own process so its peak RSS
is its own. Page cache is dropped before every measured read when the machine allows it (root on Linux), so raw read
and conversion both start cold; otherwise both run warm and the table says so.

    python benchmarks/convert_bench.py --work /tmp/wanpack-bench --layers 6 --quant int8 fp8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_read(files: list[Path], direct: bool, block: int = 16 << 20) -> float:
    """Sequential read of every file; returns GB/s."""
    import mmap

    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    total, start = 0, time.perf_counter()
    for f in files:
        flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        fd = os.open(f, flags)
        try:
            offset = 0
            while True:
                n = os.preadv(fd, [buf], offset)
                total += n
                offset += n
                if n < block:
                    break
            if not direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/wanpack-convert-bench"))
    ap.add_argument("--layers", type=int, default=6, help="14B blocks in the source (1.4 GB each in fp32)")
    ap.add_argument("--quant", nargs="+", default=["int8"])
    ap.add_argument("--keep", action="store_true", help="keep the source and packs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from wanpack.convert.synth import synth_checkpoint

    src = args.work / "source"
    if not (src / "config.json").is_file():
        shutil.rmtree(args.work, ignore_errors=True)
        t = time.perf_counter()
        synth_checkpoint(src, "wan2.1-t2v-14b", layers=args.layers, shards=max(1, args.layers // 2))
        print(f"synthesized {args.layers}-block 14B source in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    files = sorted(src.glob("*.safetensors"))
    source_gb = sum(f.stat().st_size for f in files) / 1e9
    cold = drop_caches()
    read_buffered = raw_read(files, direct=False)
    drop_caches()
    read_direct = raw_read(files, direct=True)
    rows = []
    variants = [(q, True) for q in args.quant] + [(args.quant[0], False)]  # last: without hashing the source
    for quant, hashed in variants:
        pack = args.work / f"pack-{quant}"
        shutil.rmtree(pack, ignore_errors=True)
        drop_caches()
        cmd = [sys.executable, "-m", "wanpack", "convert", str(src), "--quant", quant, "--save-by-block",
               "--out", str(pack), "--json"] + ([] if hashed else ["--no-hash-source"])  # fmt: skip
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t
        summary = json.loads(res.stdout)
        gbps = summary["source_bytes"] / wall / 1e9
        rows.append({"quant": quant + ("" if hashed else " (no source sha256)"), "seconds": round(wall, 2), "convert_gbps": round(gbps, 3),
                     "vs_buffered_read": round(gbps / read_buffered, 3), "vs_direct_read": round(gbps / read_direct, 3),
                     "peak_rss_gib": round(summary["peak_rss_bytes"] / 2**30, 3),
                     "pack_gb": round(summary["pack_bytes"] / 1e9, 2)})  # fmt: skip
        if not args.keep:
            shutil.rmtree(pack)
    result = {"source_gb": round(source_gb, 2), "layers": args.layers, "page_cache_dropped": cold,
              "raw_read_buffered_gbps": round(read_buffered, 3), "raw_read_direct_gbps": round(read_direct, 3),
              "cpus": os.cpu_count(), "runs": rows}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"source {source_gb:.2f} GB fp32 ({args.layers} x 14B blocks), page cache {'dropped' if cold else 'WARM'}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print(f"raw sequential read: buffered {read_buffered:.2f} GB/s, O_DIRECT {read_direct:.2f} GB/s")
    print(f"{'quant':26} {'time s':>7} {'GB/s':>6} {'/buffered':>9} {'/direct':>8} {'peak RSS GiB':>12} {'pack GB':>8}")
    for r in rows:
        print(f"{r['quant']:26} {r['seconds']:7.1f} {r['convert_gbps']:6.2f} {r['vs_buffered_read']:9.2f} "
              f"{r['vs_direct_read']:8.2f} {r['peak_rss_gib']:12.2f} {r['pack_gb']:8.2f}")  # fmt: skip
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
