"""Wan2.1 VAE on a GPU: peak VRAM and time of tiled decode/encode at 480p/720p, the memory model's calibration,
tiled-vs-untiled agreement, and the tiny preview decoder. Full-size random weights (dim 96), so images are noise.

Not a test: prints a table last (and --json). Rows:
  calib   one tile decoded for --calib-latents latent frames: measured peak working bytes per output pixel next to
          the estimate vae_tiling.decode_bytes_per_pixel uses to size tiles (the estimate should be >= measured)
  decode  the whole video (--frames) tiled for --budget-gib; peak VRAM includes the gathered output when --out gpu
  encode  the I2V conditioning encode (first frame + zeros) tiled for the same budget
  agree   tiled vs untiled decode of a few latent frames at 480p (random weights: see docs/VAE.md)
  tiny    the TAEHV-layout tiny decoder on the same latents (random weights)

    python benchmarks/vae_bench.py --res 480p 720p --dtype bf16 fp32 --budget-gib 4 --json vae.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from wanpack.convert.synth import random_tensor
from wanpack.manifests.arch import encoder_config, vae_tensors
from wanpack.runtime.models import tiny_vae, vae, vae_tiling

RES = {"480p": (480, 832), "720p": (720, 1280)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2**30


def _sync_time(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_reserved()


def calib_row(weights, cfg, dtype_name, tile, frames, device):
    th, tw = tile
    z = torch.randn(1, cfg.z_dim, frames, th, tw, device=device)
    _, secs, peak, reserved = _sync_time(lambda: vae.decode(weights, z, cfg, dtype=DTYPES[dtype_name], out_device="cpu"))
    px = th * tw * 64
    return {"row": "calib", "dtype": dtype_name, "tile": f"{th}x{tw}", "latent_frames": frames, "seconds": secs,
            "peak_gib": peak / GIB, "reserved_gib": reserved / GIB, "measured_bytes_per_px": peak / px,
            "estimated_bytes_per_px": vae_tiling.decode_bytes_per_pixel(cfg, DTYPES[dtype_name])}  # fmt: skip


def decode_row(weights, cfg, res, dtype_name, frames, budget, out, device):
    h, w = RES[res]
    t = (frames - 1) // 4 + 1
    z = torch.randn(1, cfg.z_dim, t, h // 8, w // 8, device=device)
    tiling = vae_tiling.tiling_for_budget(cfg, h // 8, w // 8, budget * GIB, dtype=DTYPES[dtype_name])
    out_device = "cpu" if out == "cpu" else device

    def run():
        if tiling is None:
            return vae.decode(weights, z, cfg, dtype=DTYPES[dtype_name], out_device=out_device)
        return vae_tiling.decode_tiled(weights, z, cfg, tiling, dtype=DTYPES[dtype_name], out_device=out_device)

    video, secs, peak, reserved = _sync_time(run)
    assert video.shape == (1, 3, frames, h, w)
    return {"row": "decode", "res": res, "dtype": dtype_name, "frames": frames, "budget_gib": budget,
            "tile": "none" if tiling is None else "x".join(map(str, tiling.tile)), "out": out, "seconds": secs,
            "fps": frames / secs, "peak_gib": peak / GIB, "reserved_gib": reserved / GIB}  # fmt: skip


def encode_row(weights, cfg, res, dtype_name, frames, budget, device):
    h, w = RES[res]
    video = torch.zeros(1, 3, frames, h, w, device=device)
    video[:, :, 0] = torch.rand(3, h, w, device=device) * 2 - 1
    tiling = vae_tiling.tiling_for_budget(cfg, h // 8, w // 8, budget * GIB, dtype=DTYPES[dtype_name])

    def run():
        if tiling is None:
            return vae.encode(weights, video, cfg, dtype=DTYPES[dtype_name])
        return vae_tiling.encode_tiled(weights, video, cfg, tiling, dtype=DTYPES[dtype_name])

    _, secs, peak, reserved = _sync_time(run)
    return {"row": "encode", "res": res, "dtype": dtype_name, "frames": frames, "budget_gib": budget,
            "tile": "none" if tiling is None else "x".join(map(str, tiling.tile)), "seconds": secs,
            "peak_gib": peak / GIB, "reserved_gib": reserved / GIB}  # fmt: skip


def agree_row(weights, cfg, dtype_name, latent_frames, budget, device):
    h, w = RES["480p"]
    z = torch.randn(1, cfg.z_dim, latent_frames, h // 8, w // 8, device=device)
    full = vae.decode(weights, z, cfg, dtype=DTYPES[dtype_name])
    tiling = vae_tiling.tiling_for_budget(cfg, h // 8, w // 8, budget * GIB, dtype=DTYPES[dtype_name])
    tiling = tiling or vae_tiling.Tiling((h // 16 + 4, w // 16 + 4))
    tiled = vae_tiling.decode_tiled(weights, z, cfg, tiling, dtype=DTYPES[dtype_name])
    diff = (tiled - full).abs()
    return {"row": "agree", "res": "480p", "dtype": dtype_name, "latent_frames": latent_frames,
            "tile": "x".join(map(str, tiling.tile)), "mean_abs": diff.mean().item(), "max_abs": diff.max().item(),
            "untiled_std": full.std().item()}  # fmt: skip


def tiny_row(res, dtype_name, frames, device):
    specs = tiny_vae.tiny_vae_tensors()
    from wanpack.manifests.arch import TensorSpec

    weights = {k: random_tensor(TensorSpec(k, s), 0, torch.float32).to(device) for k, s in specs.items()}
    h, w = RES[res]
    z = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, device=device)
    _, secs, peak, reserved = _sync_time(lambda: tiny_vae.tiny_decode(weights, z, dtype=DTYPES[dtype_name],
                                                                      out_device="cpu"))  # fmt: skip
    return {"row": "tiny", "res": res, "dtype": dtype_name, "frames": frames, "seconds": secs, "fps": frames / secs,
            "peak_gib": peak / GIB, "reserved_gib": reserved / GIB}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", nargs="+", default=["480p", "720p"], choices=list(RES))
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--budget-gib", type=float, default=4.0, help="VAE working-memory budget that sizes the tiles")
    ap.add_argument("--out", choices=["gpu", "cpu"], default="cpu", help="where decoded frames are gathered")
    ap.add_argument("--calib-tiles", nargs="+", default=["32x32", "48x64"], help="latent tile sizes to calibrate")
    ap.add_argument("--calib-latents", type=int, default=3)
    ap.add_argument("--agree-latents", type=int, default=3, help="0 skips the tiled-vs-untiled row")
    ap.add_argument("--skip", nargs="*", default=[], choices=["calib", "decode", "encode", "agree", "tiny"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("vae_bench needs a CUDA device")
    device = torch.device("cuda")
    cfg = encoder_config("vae")
    weights = {s.name: random_tensor(s, 0, torch.float32).to(device) for s in vae_tensors(cfg)}
    rows = []
    with torch.inference_mode():
        for dtype_name in args.dtype:
            if "calib" not in args.skip:
                for tile in args.calib_tiles:
                    th, tw = map(int, tile.split("x"))
                    rows.append(calib_row(weights, cfg, dtype_name, (th, tw), args.calib_latents, device))
                    print(json.dumps(rows[-1]), flush=True)
            for res in args.res:
                if "decode" not in args.skip:
                    rows.append(decode_row(weights, cfg, res, dtype_name, args.frames, args.budget_gib, args.out, device))
                    print(json.dumps(rows[-1]), flush=True)
                if "encode" not in args.skip:
                    rows.append(encode_row(weights, cfg, res, dtype_name, args.frames, args.budget_gib, device))
                    print(json.dumps(rows[-1]), flush=True)
                if "tiny" not in args.skip:
                    rows.append(tiny_row(res, dtype_name, args.frames, device))
                    print(json.dumps(rows[-1]), flush=True)
            if "agree" not in args.skip and args.agree_latents > 0:
                rows.append(agree_row(weights, cfg, dtype_name, args.agree_latents, args.budget_gib, device))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'row':7} {'res':5} {'dtype':5} {'tile':8} {'seconds':>8} {'peak GiB':>9} {'rsv GiB':>8}  extra")
    for r in rows:
        extra = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                 if k in ("measured_bytes_per_px", "estimated_bytes_per_px", "mean_abs", "max_abs", "fps")}  # fmt: skip
        print(f"{r['row']:7} {r.get('res', '-'):5} {r['dtype']:5} {r.get('tile', '-'):8} {r.get('seconds', 0):8.2f} "
              f"{r.get('peak_gib', 0):9.2f} {r.get('reserved_gib', 0):8.2f}  {extra}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
