"""480p VAE decode on a GPU: untiled fp32 vs bf16 (time, peak working memory), the ops where fp32 peaks, and how far
bf16 untiled and fp32 in two tiles land from fp32 untiled. Full-size random weights. Not a test: prints, writes JSON.

    python benchmarks/vae_dtype_probe.py vae_dtype.json
"""

from __future__ import annotations

import json
import sys
import time

import torch

from wanpack.convert.synth import random_tensor
from wanpack.manifests.arch import VAEConfig, vae_tensors
from wanpack.runtime.models import vae, vae_tiling

GIB = 2**30
TRACED = ("_causal_conv", "_frame_conv", "_rms_norm", "_attention_block", "_upsample")


def timed_decode(weights, cfg, latent, dtype) -> tuple[float, float]:
    """(seconds, peak working GiB) of a chunked decode whose frames go to the CPU as they come."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for chunk in vae.decode_frames(weights, latent, cfg, dtype=dtype):
        chunk.cpu()
    torch.cuda.synchronize()
    return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / GIB


def peak_ops(weights, cfg, latent, top: int = 12) -> list[dict]:
    """The layers with the highest peak allocation in fp32 (from the third latent frame on: the caches are full)."""
    records = []
    originals = {name: getattr(vae, name) for name in TRACED}

    def traced(name, fn):
        def call(*args, **kwargs):
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            result = fn(*args, **kwargs)
            label = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            records.append((name, label, before, torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()))
            return result

        return call

    base = torch.cuda.memory_allocated()
    try:
        for name, fn in originals.items():
            setattr(vae, name, traced(name, fn))
        for i, chunk in enumerate(vae.decode_frames(weights, latent, cfg)):
            if i == 2:
                records.clear()
            chunk.cpu()
    finally:
        for name, fn in originals.items():
            setattr(vae, name, fn)
    rows = sorted(records, key=lambda r: -r[3])[:top]
    return [{"op": op, "name": label, "before": round((b - base) / GIB, 3), "peak": round((p - base) / GIB, 3),
             "after": round((a - base) / GIB, 3)} for op, label, b, p, a in rows]  # fmt: skip


def levels(v: torch.Tensor) -> torch.Tensor:
    return ((v.clamp(-1, 1) + 1) * 127.5).round()


def distance(got: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = levels(got) - levels(ref)
    return {"rel_l2": round(((got - ref).norm() / ref.norm()).item(), 5), "u8_mean_abs": round(diff.abs().mean().item(), 4),
            "u8_max": diff.abs().max().item()}  # fmt: skip


def main() -> None:
    dev = torch.device("cuda")
    cfg = VAEConfig("vae")
    weights = {s.name: random_tensor(s, 0, torch.float32).to(dev) for s in vae_tensors(cfg)}
    z = torch.randn(1, 16, 21, 60, 104, device=dev)
    out: dict = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        timed_decode(weights, cfg, z[:, :, :3], dtype)  # kernels loaded, plans made
        secs, peak = timed_decode(weights, cfg, z, dtype)
        out[f"untiled_{name}"] = {"s": round(secs, 3), "peak_gib": round(peak, 3)}
        print(name, out[f"untiled_{name}"], flush=True)
    out["top_ops_fp32"] = peak_ops(weights, cfg, z[:, :, :4])
    for row in out["top_ops_fp32"]:
        print(row)
    z3 = z[:, :, :3]
    ref = vae.decode(weights, z3, cfg)
    out["bf16_vs_fp32"] = distance(vae.decode(weights, z3, cfg, dtype=torch.bfloat16), ref)
    out["tiled2_vs_fp32"] = distance(vae_tiling.decode_tiled(weights, z3, cfg, vae_tiling.Tiling((60, 56), (8, 8))), ref)
    print("bf16", out["bf16_vs_fp32"])
    print("tiled", out["tiled2_vs_fp32"])
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
