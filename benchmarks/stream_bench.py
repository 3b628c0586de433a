"""Streaming benchmark on one GPU: the four measurements of issue 4 on synthetic 14B-shaped packs, VRAM capped to 8 GiB.

Not a test: prints a table (and --json) to record in docs/PERFORMANCE.md. Packs are made with the project's own synth +
converter (int8 and bf16, full 14B widths, --layers blocks; every block has the real 14B size, so per-block timings
and slot memory are those of the 40-layer model) and reused from --work when already there.

  1. 480p latent (21x60x104), weights from the host cache: streamed / resident (goal <= 1.03)
  2. small latent (5x24x40, transfer-bound): achieved H2D / pinned memcpy peak of the same run (goal >= 0.90)
  3. host cache off, page cache dropped: achieved read / raw O_DIRECT read of the same ranges (goal >= 0.85)
  4. peak VRAM reserved, int8, at 480p (goal <= 5 GiB) and 720p (goal <= 8 GiB); peak RSS with cache off (<= 4 GiB)
Plus graph mode on the small latent, where launch overhead matters (captures and replays counted; compare with
int8_480p's small_* rows) and, with --timeline, the per-unit copy/compute timeline.

    python benchmarks/stream_bench.py --work /tmp/wanpack-stream --json /tmp/stream.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

GiB = 1 << 30
LAT_480 = (21, 60, 104)
LAT_720 = (21, 90, 160)
LAT_SMALL = (5, 24, 40)


def make_pack(work: Path, quant: str, layers: int, dim_scale: str = "full") -> Path:
    """Synth a bf16 14B-shaped source once, convert it to ``quant``; reuse a finished pack."""
    from wanpack.convert.converter import ConvertOptions, convert_checkpoint
    from wanpack.convert.synth import synth_checkpoint

    pack = work / f"t2v14b-{layers}l-{dim_scale}-{quant}"
    if (pack / "manifest.json").is_file():
        return pack
    src = work / f"src-{layers}l-{dim_scale}"
    if not (src / "config.json").is_file():
        t0 = time.perf_counter()
        synth_checkpoint(src, "wan2.1-t2v-14b", layers=layers, dtype="bf16", dim_scale=dim_scale)
        print(f"synth source: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    t0 = time.perf_counter()
    convert_checkpoint(src, pack, ConvertOptions(arch="wan2.1-t2v-14b", quant=quant, hash_source=False))
    print(f"convert {quant}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return pack


def free_host_cache() -> None:
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None:
        fn()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/wanpack-stream"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vram-cap", default="8GiB")
    ap.add_argument("--ram-budget", default="32GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="auto", help="auto (DiT if merged), dit or proxy")
    ap.add_argument("--granularity", default="block")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--skip-720p", action="store_true")
    ap.add_argument("--timeline", type=Path, default=None, help="write the 480p cached run's timeline JSON here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the packs and source in --work")
    ap.add_argument("--smoke", action="store_true", help="tiny widths and latents, CPU allowed: checks the script only")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("stream_bench needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 1
    global LAT_480, LAT_720, LAT_SMALL
    if args.smoke:
        LAT_480, LAT_720, LAT_SMALL = (3, 8, 12), (3, 12, 16), (1, 4, 4)
    from wanpack.runtime.stream.bench import run_suite
    from wanpack.runtime.stream.planner import parse_size

    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    scale = "tiny" if args.smoke else "full"
    packs = {"int8": make_pack(args.work, "int8", args.layers, scale)}
    if not args.skip_bf16:
        packs["bf16"] = make_pack(args.work, "none", args.layers, scale)
    if not args.keep:
        shutil.rmtree(args.work / f"src-{args.layers}l-{scale}", ignore_errors=True)
    cap, ram = parse_size(args.vram_cap), parse_size(args.ram_budget)
    common = {"vram_budget": cap, "ram_budget": ram, "repeats": args.repeats, "model": args.model,
              "granularity": args.granularity, "log": lambda m: print(m, file=sys.stderr)}  # fmt: skip
    cases = [("int8_480p", "int8", {"latent": LAT_480, "small_latent": LAT_SMALL,
                                     "timeline": args.timeline is not None}),
             ("int8_small_graph", "int8", {"latent": LAT_SMALL, "small_latent": None, "graph": True,
                                           "disk": False})]  # fmt: skip
    if not args.skip_720p:
        cases.append(("int8_720p", "int8", {"latent": LAT_720, "small_latent": None, "resident": False,
                                            "disk": False}))  # fmt: skip
    if "bf16" in packs:
        cases.append(("bf16_480p", "bf16", {"latent": LAT_480, "small_latent": LAT_SMALL}))
    results: dict = {}
    for case, quant, kw in cases:
        try:
            results[case] = run_suite(packs[quant], **kw, **common)
        except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others' numbers
            results[case] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{case} failed: {exc}", file=sys.stderr)
        if torch.cuda.is_available():
            free_host_cache()
            torch.cuda.empty_cache()
    if args.timeline is not None and "runs" in results.get("int8_480p", {}):
        tl = results["int8_480p"]["runs"]["streamed_cached"].pop("timeline", [])
        args.timeline.write_text(json.dumps(tl, indent=1) + "\n")
    results["wall_s"] = time.perf_counter() - t_start
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print_summary(results)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


def print_summary(results: dict) -> None:
    rows = []
    ok = {k: r for k, r in results.items() if isinstance(r, dict) and "runs" in r}
    for case, r in ok.items():
        for name, run in r["runs"].items():
            rows.append((case, name, run["sec_per_forward"], run.get("h2d_gbps", 0), run.get("disk_gbps", 0),
                         run.get("peak_vram_reserved", 0) / GiB, run["peak_rss"] / GiB,
                         f"{run['graph_captures']}/{run['graph_replays']}"))  # fmt: skip
    if not ok:
        print("every case failed:", results)
        return
    first = next(iter(ok.values()))
    print(f"\nstream_bench on {first['device']}, torch {first['torch']}, {first['date']}, model {first['runs']['streamed_cached']['model']}")  # noqa: E501
    print(f"{'case':<16}{'run':<16}{'s/fwd':>8}{'H2D GB/s':>10}{'disk GB/s':>10}{'VRAM GiB':>10}{'RSS GiB':>9}"
          f"{'graphs':>10}")  # fmt: skip
    for case, name, sec, h2d, disk, vram, rss, graphs in rows:
        print(f"{case:<16}{name:<16}{sec:>8.3f}{h2d:>10.1f}{disk:>10.2f}{vram:>10.2f}{rss:>9.2f}{graphs:>10}")
    print()
    for case, r in results.items():
        if isinstance(r, dict) and "error" in r:
            print(f"{case}: FAILED {r['error']}")
            continue
        if case not in ok:
            continue
        ceil = f"H2D peak {r.get('h2d_peak_gbps', 0):.1f} GB/s, raw read {r['disk_peak_gbps']:.2f} GB/s"
        goals = ", ".join(f"{k} {v:.3f}" for k, v in r["summary"].items())
        print(f"{case}: {ceil}; {goals}")
    print(f"goals: streamed_cached_over_resident <= 1.03 (480p), small_h2d_fraction_of_peak >= 0.90, "
          f"disk_fraction_of_raw >= 0.85, VRAM int8 480p <= 5 GiB / 720p <= 8 GiB, RSS cache-off <= 4 GiB; "
          f"wall {results['wall_s']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
