"""Measurements behind `wanpack bench` and benchmarks/stream_bench.py: each achieved rate next to its ceiling.

Ceilings are measured in the same process: pinned host-to-device memcpy of one large buffer (the link's practical
peak) and a plain multi-threaded O_DIRECT read of the very same shard ranges (the drive's practical peak). Forwards
run the DiT from runtime/models/dit.py when it is installed, else a proxy with the same per-phase GEMMs and attention
shapes (the streaming numbers depend on compute time per block, not on the exact math).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wanpack.runtime.ops.linear import linear
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.stream.engine import StreamEngine, StreamOptions
from wanpack.runtime.stream.reader import aligned_empty

GB = 1e9


# ----------------------------------------------------------------------------------------------------- ceilings


def pinned_h2d_peak(device: torch.device, nbytes: int = 512 << 20, repeats: int = 10) -> float:
    """GB/s of one large pinned -> device copy, best of ``repeats``."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src, non_blocking=True)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    del src, dst
    return nbytes / best / GB


def drop_page_cache(paths: list[str], everything: bool = True) -> bool:
    """Evict the files from the page cache (fadvise); with ``everything``, also the whole page cache (drop_caches,
    when root: a machine just booted, libraries included). Returns whether drop_caches ran."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        except OSError:
            pass
    if not everything:
        return False
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def raw_direct_read(ranges: list[tuple[str, int, int]], workers: int, chunk: int = 16 << 20) -> tuple[float, bool]:
    """GB/s of reading the (path, offset, length) ranges with ``workers`` threads, O_DIRECT when allowed."""
    tasks = [(p, o + s, min(chunk, n - s)) for p, o, n in ranges for s in range(0, n, chunk)]
    flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
    direct = True
    fds = {}
    for p in {r[0] for r in ranges}:
        try:
            fds[p] = os.open(p, flags)
        except OSError:
            fds[p], direct = os.open(p, os.O_RDONLY), False
    bufs = [aligned_empty(chunk) for _ in range(workers)]

    def work(i: int) -> int:
        view, total = memoryview(bufs[i].numpy()), 0
        for p, off, n in tasks[i::workers]:
            total += os.preadv(fds[p], [view[: (n + 4095) // 4096 * 4096]], off)
        return total

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(work, range(workers)))
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return total / dt / GB, direct


def peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5\n")
    except OSError:
        pass


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------------------------------- compute


@dataclass
class Workload:
    """What one forward computes: a fresh start activation (phases may update it in place), the callback, extras."""

    make_x: Callable[[], torch.Tensor]
    fn: Callable
    extras: tuple
    graph_key: Callable | None = None


def proxy_workload(pack: PackComponent, tokens: int, dtype: torch.dtype, device: torch.device,
                   chunk: int = 8192) -> Workload:  # fmt: skip
    """The DiT's per-phase GEMMs and attention on random activations; x [tokens, dim] in ``dtype``."""
    cfg = pack.entry.config
    dim, heads, text_len = int(cfg["dim"]), int(cfg["num_heads"]), int(cfg.get("text_len", 512))
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(tokens, dim, generator=gen) * 0.1).to(dtype).to(device)
    ctx = (torch.randn(text_len, dim, generator=gen) * 0.1).to(dtype).to(device)

    def lin(w, name, h):
        return linear(h, w[f"{name}.weight"], w.get(f"{name}.bias"), w.get(f"{name}.weight_scale"))

    def attn(q, k, v):
        split = lambda t: t.view(1, -1, heads, dim // heads).transpose(1, 2)  # noqa: E731
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(-1, dim)

    def fn(unit, w, x, ctx):
        for phase in unit.phases:
            if phase == "self_attn":
                x = x + lin(w, "self_attn.o", attn(lin(w, "self_attn.q", x), lin(w, "self_attn.k", x),
                                                   lin(w, "self_attn.v", x)))  # fmt: skip
            elif phase == "cross_attn":
                x = x + lin(w, "cross_attn.o", attn(lin(w, "cross_attn.q", x), lin(w, "cross_attn.k", ctx),
                                                    lin(w, "cross_attn.v", ctx)))  # fmt: skip
            elif phase == "ffn":
                x = torch.cat([x[s : s + chunk] + lin(w, "ffn.2", F.gelu(lin(w, "ffn.0", x[s : s + chunk]),
                               approximate="tanh")) for s in range(0, x.shape[0], chunk)])  # fmt: skip
        return x

    return Workload(x.clone, fn, (ctx,))


def make_workload(pack: PackComponent, latent: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                  engine_resident: dict, model: str = "auto", chunk: int = 8192) -> tuple[str, Workload]:  # fmt: skip
    """The real DiT when available (``model`` auto|dit), else the proxy."""
    if model in ("auto", "dit"):
        try:
            from wanpack.runtime.stream.dit_stream import dit_workload

            return "dit", dit_workload(pack, latent, dtype, device, engine_resident, chunk)
        except ImportError:
            if model == "dit":
                raise
    f, h, w = latent
    return "proxy", proxy_workload(pack, f * (h // 2) * (w // 2), dtype, device, chunk)


# ----------------------------------------------------------------------------------------------------- runs


def time_forwards(engine: StreamEngine, work: Workload, repeats: int) -> tuple[float, list[float]]:
    """Seconds per forward (median of ``repeats`` after one warm-up forward), synchronizing only between forwards.

    Each forward starts from a fresh x (``make_x``): DiT phases update the residual in place.
    """
    times = []
    for i in range(repeats + 1):
        _sync(engine.device)
        t0 = time.perf_counter()
        y = engine.run(work.make_x(), work.fn, *work.extras, graph_key=work.graph_key)
        _sync(engine.device)
        if i:
            times.append(time.perf_counter() - t0)
        del y
    times.sort()
    return times[len(times) // 2], times


def measure(pack: PackComponent, options: StreamOptions, work_factory: Callable, device: torch.device,
            repeats: int, vram_cap: int | None = None, drop_cache: bool = False) -> dict:  # fmt: skip
    """One configuration: time per forward, bytes moved per forward, achieved rates, peak VRAM and RSS."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, vram_cap / torch.cuda.get_device_properties(device).total_memory) if vram_cap else 1.0)
        torch.cuda.reset_peak_memory_stats(device)
    peak_rss_reset()
    with StreamEngine(pack, options, device) as eng:
        model, work = work_factory(eng.resident)
        if drop_cache:
            drop_page_cache([str(pack.path(s)) for s in eng.files])
        disk0, h2d0 = eng.bytes_requested, eng.dev.bytes_copied
        # warm-up forward inside time_forwards fills caches/graphs; count bytes of the timed forwards only
        _sync(device)
        first = time.perf_counter()
        eng.run(work.make_x(), work.fn, *work.extras, graph_key=work.graph_key)
        _sync(device)
        warm_s = time.perf_counter() - first
        disk1, h2d1 = eng.bytes_requested, eng.dev.bytes_copied
        sec, all_times = time_forwards(eng, work, repeats)
        n = repeats + 1
        disk = (eng.bytes_requested - disk1) / n
        h2d = (eng.dev.bytes_copied - h2d1) / n
        result = {
            "model": model, "granularity": options.granularity, "device_slots": eng.k, "prefetch": eng.prefetch,
            "cached_units": len(options.cache_units), "disk_workers": options.disk_workers,
            "sec_per_forward": sec, "first_forward_s": warm_s, "times": all_times,
            "disk_bytes_per_forward": disk, "h2d_bytes_per_forward": h2d,
            "disk_gbps": disk / sec / GB if disk else 0.0, "h2d_gbps": h2d / sec / GB if h2d else 0.0,
            "first_disk_bytes": disk1 - disk0, "first_h2d_bytes": h2d1 - h2d0,
            "direct_io": all(f.direct for f in eng.files.values()),
            "graph_captures": eng.graphs.captures if eng.graphs else 0,
            "graph_replays": eng.graphs.replays if eng.graphs else 0,
        }  # fmt: skip
        if options.timeline:
            result["timeline"] = eng.timeline()
    if cuda:
        result["peak_vram_reserved"] = torch.cuda.max_memory_reserved(device)
        result["peak_vram_allocated"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.set_per_process_memory_fraction(1.0)
    result["peak_rss"] = peak_rss()
    return result


def _sync(device: torch.device) -> None:
    """Between timed forwards only: the streaming loop itself never synchronizes."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------- suite


def run_suite(pack_dir, *, latent: tuple[int, int, int], small_latent: tuple[int, int, int] | None,
              vram_budget: int, ram_budget: int, repeats: int = 3, model: str = "auto",
              dtype: torch.dtype = torch.bfloat16, graph: bool = False, timeline: bool = False,
              granularity: str = "block", disk_workers: int | None = None, resident: bool = True,
              disk: bool = True, device: torch.device | None = None, log=print) -> dict:  # fmt: skip
    """Resident vs streamed (host cache on, off), plus a transfer-bound small latent, with measured ceilings."""
    from wanpack.runtime.stream.planner import plan

    comp = PackComponent(pack_dir)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    out: dict = {"pack": str(pack_dir), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                 "torch": torch.__version__, "latent": list(latent), "dtype": str(dtype), "graph_mode": graph,
                 "vram_budget": vram_budget, "ram_budget": ram_budget,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip

    def plan_for(lat):
        f, h, w = lat
        return plan(comp, vram_budget=vram_budget, ram_budget=ram_budget, width=w * 8, height=h * 8,
                    frames=(f - 1) * 4 + 1, granularity=granularity, disk_workers=disk_workers)  # fmt: skip

    main_plan = plan_for(latent)
    workers = main_plan.disk_workers
    out["plan"] = {k: v for k, v in main_plan.to_dict().items() if k != "cache_units"}
    if cuda:
        out["h2d_peak_gbps"] = pinned_h2d_peak(device)
        log(f"pinned H2D peak: {out['h2d_peak_gbps']:.1f} GB/s")
    units = comp.units("block")
    ranges = []
    for u in units:
        size = os.path.getsize(comp.path(u.shard))
        ranges.append((str(comp.path(u.shard)), u.offset, max(0, min(u.length, size - u.offset))))
    out["page_cache_dropped"] = drop_page_cache(sorted({r[0] for r in ranges}))
    out["disk_peak_gbps"], out["disk_peak_direct"] = raw_direct_read(ranges, workers)
    log(f"raw read of the block ranges ({workers} threads): {out['disk_peak_gbps']:.2f} GB/s")

    def factory(lat, chunk):
        return lambda res: make_workload(comp, lat, dtype, device, res, model, chunk)

    def run(name, options, lat, chunk, cap, drop=False):
        log(f"running {name} ...")
        r = measure(comp, options, factory(lat, chunk), device, repeats, vram_cap=cap, drop_cache=drop)
        out.setdefault("runs", {})[name] = r
        log(f"  {name}: {r['sec_per_forward']:.3f} s/forward")
        return r

    chunk = main_plan.ffn_chunk
    n_units = len(comp.units(main_plan.granularity))
    base = {"graph": graph, "disk_workers": workers}
    if resident:
        run("resident", StreamOptions(granularity="model", host_slots=2, **base), latent, chunk, None)
    run("streamed_cached", main_plan.options(cache_units=list(range(n_units)), timeline=timeline, **base), latent,
        chunk, vram_budget)  # fmt: skip
    if disk:
        run("streamed_disk", main_plan.options(cache_units=[], **base), latent, chunk, vram_budget, drop=True)
    if small_latent:
        sp = plan_for(small_latent)
        if resident:
            run("small_resident", StreamOptions(granularity="model", host_slots=2, **base), small_latent,
                sp.ffn_chunk, None)  # fmt: skip
        run("small_streamed", sp.options(cache_units=list(range(len(comp.units(sp.granularity)))), **base),
            small_latent, sp.ffn_chunk, vram_budget)  # fmt: skip
    runs = out["runs"]
    summary = {}
    if "resident" in runs:
        for name in ("streamed_cached", "streamed_disk"):
            if name in runs:
                summary[f"{name}_over_resident"] = runs[name]["sec_per_forward"] / runs["resident"]["sec_per_forward"]
    if "small_streamed" in runs and cuda:
        summary["small_h2d_fraction_of_peak"] = runs["small_streamed"]["h2d_gbps"] / out["h2d_peak_gbps"]
    if "streamed_disk" in runs and out["disk_peak_gbps"]:
        summary["disk_fraction_of_raw"] = runs["streamed_disk"]["disk_gbps"] / out["disk_peak_gbps"]
    out["summary"] = summary
    return out
