"""The whole `wanpack run` pipeline on a full-size 14B-shaped random-weight pack: streamed under a VRAM cap vs resident.

Not a test: prints a table (and --json) for docs/PERFORMANCE.md. Builds the pack with `synth --as-pack` (DiT int8 by
block, full umt5-xxl T5 int8, the full VAE), then runs text -> denoise -> decode -> mp4 with the 4-step distilled
schedule (no CFG), 81 frames:
  resident   480p, no cap, the DiT loaded whole (granularity model)
  streamed   480p, VRAM capped (torch.cuda.set_per_process_memory_fraction) and budgeted to --cap-gib
  streamed   720p, same cap
    python benchmarks/pipeline_bench.py --work /tmp/wanpack-pipe --cap-gib 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch


def build_pack(work: Path, arch: str, layers: int | None) -> Path:
    from wanpack.convert.converter import ConvertOptions
    from wanpack.convert.synth_pack import synth_pack

    pack = work / "pack"
    if not (pack / "manifest.json").is_file():
        t = time.perf_counter()
        _, stats = synth_pack(pack, arch, layers=layers, components=("dit", "t5", "vae"),
                              options=ConvertOptions(quant="int8", force=True))  # fmt: skip
        print(f"built {pack}: {stats.pack_bytes / 1e9:.1f} GB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return pack


def one_run(pack: Path, work: Path, name: str, *, height: int, width: int, cap_gib: float | None,
            resident: bool, frames: int, steps: int | None = None) -> dict:  # fmt: skip
    from wanpack.manifests.run_config import resolve_run_config
    from wanpack.runtime.pipeline import RunRequest, run

    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2**30 / total) if cap_gib else 1.0)
    overrides = {"height": height, "width": width, "frames": frames, "seed": 7, "save_latents": True,
                 "vram_budget_gib": cap_gib, "vae_tiling": cap_gib is not None}  # fmt: skip
    if steps is not None:
        overrides.update({"steps": steps, "denoising_step_list": [1000, 750, 500, 250][:steps]})
    if resident:
        overrides.update({"cpu_offload": False, "offload_granularity": "model"})
    else:  # blocks from the RAM cache (the disk path is measured by stream_bench); the planner picks slots/chunks
        overrides.update({"lazy_load": False, "offload_granularity": "block"})
    cfg = resolve_run_config("distill-4step", None, overrides)
    out = work / f"{name}.mp4"
    t = time.perf_counter()
    record = run(RunRequest(pack=pack, prompt="a fox running through snow", out=out, config=cfg, synthetic=True),
                 lambda e, i: print(f"[{name}] {e} {i.get('name', i.get('step', i.get('text', '')))}", file=sys.stderr))  # fmt: skip
    return {"name": name, "wall_s": round(time.perf_counter() - t, 2), "timings_s": record.timings_s,
            "peak_vram_reserved_gib": round(record.peak_vram_bytes["reserved"] / 2**30, 3),
            "peak_vram_allocated_gib": round(record.peak_vram_bytes["allocated"] / 2**30, 3),
            "peak_rss_gib": round(record.peak_rss_bytes / 2**30, 2), "latents": record.latents}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/wanpack-pipeline-bench"))
    ap.add_argument("--arch", default="wan2.1-t2v-14b")
    ap.add_argument("--layers", type=int, default=None, help="DiT blocks (default: all 40)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--cap-gib", type=float, default=8.0)
    ap.add_argument("--skip-720p", action="store_true")
    ap.add_argument("--warmup", action="store_true", help="one untimed 1-step run first (kernel autotune, page cache)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pack = build_pack(args.work, args.arch, args.layers)
    plans = [("resident-480p", 480, 832, None, True), ("streamed-480p", 480, 832, args.cap_gib, False)]
    if not args.skip_720p:
        plans.append(("streamed-720p", 720, 1280, args.cap_gib, False))
    rows = []
    if args.warmup:
        one_run(pack, args.work, "warmup", height=480, width=832, cap_gib=None, resident=True, frames=args.frames,
                steps=1)  # fmt: skip
    for name, h, w, cap, resident in plans:
        try:
            rows.append(one_run(pack, args.work, name, height=h, width=w, cap_gib=cap, resident=resident,
                                frames=args.frames))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - report every case, keep going
            traceback.print_exc()
            rows.append({"name": name, "error": f"{type(exc).__name__}: {exc}"})
    by = {r["name"]: r for r in rows}
    same = None
    if "latents" in by.get("resident-480p", {}) and "latents" in by.get("streamed-480p", {}):
        from safetensors.torch import load_file

        a, b = (next(iter(load_file(by[n]["latents"]).values())) for n in ("resident-480p", "streamed-480p"))
        same = float((a.float() - b.float()).abs().max())
    result = {"device": torch.cuda.get_device_name(), "arch": args.arch, "frames": args.frames, "cap_gib": args.cap_gib,
              "runs": rows, "latent_max_abs_diff_streamed_vs_resident": same}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"{result['device']}, {args.arch} random weights int8, distill 4 steps, {args.frames} frames, cap {args.cap_gib} GiB")
    print(f"{'run':15} {'total s':>8} {'text':>6} {'denoise':>8} {'decode':>7} {'write':>6} {'VRAM res GiB':>12} {'RSS GiB':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:15} ERROR {r['error'][:100]}")
            continue
        t = r["timings_s"]
        print(f"{r['name']:15} {t.get('total', 0):8.1f} {t.get('text', 0):6.1f} {t.get('denoise', 0):8.1f} "
              f"{t.get('decode', 0):7.1f} {t.get('write', 0):6.1f} {r['peak_vram_reserved_gib']:12.2f} {r['peak_rss_gib']:8.2f}")  # fmt: skip
    if "timings_s" in by.get("resident-480p", {}) and "timings_s" in by.get("streamed-480p", {}):
        res, st = by["resident-480p"]["timings_s"], by["streamed-480p"]["timings_s"]
        print(f"streamed/resident 480p: total {st['total'] / res['total']:.3f}, denoise {st['denoise'] / res['denoise']:.3f}; "
              f"latent max |diff| {same}")  # fmt: skip


if __name__ == "__main__":
    main()
