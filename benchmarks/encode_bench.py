"""The mp4 encoder when every frame arrives at once (a tiled VAE decode): seconds from handing over the frames to a
finished file, per candidate x264 setting, through the same VideoWriter a run uses.

Not a test: prints a table last (and --json). Two kinds of frames: ``noise`` (what random-weight packs make, the
worst case for x264) and ``smooth`` (a moving gradient, closer to real video). Runs on any machine (CPU only).

    python benchmarks/encode_bench.py --res 480p 720p --frames 81 --json encode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from wanpack.runtime.video import BURST_ENCODER_SETTINGS, ENCODER_SETTINGS, VideoWriter

RES = {"480p": (480, 832), "720p": (720, 1280)}
CANDIDATES = {
    "veryfast+zerolatency": ENCODER_SETTINGS,
    "burst (current)": BURST_ENCODER_SETTINGS,
    "ultrafast+zerolatency": {**ENCODER_SETTINGS, "preset": "ultrafast", "tune": "zerolatency"},
    "ultrafast, frame threads": {k: v for k, v in {**ENCODER_SETTINGS, "preset": "ultrafast"}.items() if k != "tune"},
    "superfast, frame threads": {k: v for k, v in {**ENCODER_SETTINGS, "preset": "superfast"}.items() if k != "tune"},
}


def frames_of(kind: str, n: int, h: int, w: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if kind == "noise":
        return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    t = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y = torch.arange(h, dtype=torch.float32).view(1, h, 1, 1)
    x = torch.arange(w, dtype=torch.float32).view(1, 1, w, 1)
    c = torch.tensor([0.0, 2.0, 4.0]).view(1, 1, 1, 3)
    img = 127.5 + 120 * torch.sin((x + 3 * t) / 40 + c) * torch.cos((y - 2 * t) / 30)
    return img.round().clamp(0, 255).to(torch.uint8)


def burst_seconds(frames: torch.Tensor, settings: dict, folder: Path) -> tuple[float, int]:
    """Seconds from put() of every frame to the file being complete, and the file's size."""
    n, h, w, _ = frames.shape
    out = folder / "burst.mp4"
    writer = VideoWriter(out, w, h, 16, settings)
    t0 = time.perf_counter()
    writer.put(frames)
    writer.close()
    seconds = time.perf_counter() - t0
    size = out.stat().st_size
    out.unlink()
    return seconds, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", nargs="+", default=["480p", "720p"], choices=list(RES))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--kinds", nargs="+", default=["noise", "smooth"], choices=["noise", "smooth"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.res:
            h, w = RES[res]
            for kind in args.kinds:
                frames = frames_of(kind, args.frames, h, w)
                for name, settings in CANDIDATES.items():
                    runs = [burst_seconds(frames, settings, Path(tmp)) for _ in range(args.iters)]
                    rows.append({"res": res, "frames": kind, "setting": name, "settings": settings,
                                 "seconds": statistics.median(s for s, _ in runs), "mb": runs[0][1] / 1e6})  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=1))
    print(f"{os.cpu_count()} CPUs, {args.frames} frames handed over at once; seconds to a finished file (median of {args.iters})")
    print(f"{'res':5} {'frames':7} {'setting':26} {'seconds':>7} {'MB':>7}")
    for r in rows:
        print(f"{r['res']:5} {r['frames']:7} {r['setting']:26} {r['seconds']:7.3f} {r['mb']:7.2f}")


if __name__ == "__main__":
    main()
