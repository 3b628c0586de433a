"""Full-width umt5-xxl and CLIP ViT-H/14 blocks on a GPU: time per phase and block, TFLOP/s next to the bf16 matmul
ceiling measured in the same run, peak memory, and the error of bf16 / int8 / fp8 weights against fp32.

Random weights with the real shapes (T5: 2 prompts x 512 tokens; CLIP: 1 image x 257 tokens). The whole-encoder
times are extrapolated from one block (24 T5 blocks, 31 CLIP blocks), which is what a resident run costs in compute;
streaming adds no compute. int8/fp8 weights go through the reference linear (dequantize, then bf16 matmul), the
path every card has; the fast int8/fp8 GEMMs of the DiT work plug in behind the same op.

    python benchmarks/encoders_bench.py [--json out.json] [--iters 10]
    python benchmarks/encoders_bench.py --device cpu --tiny      # smoke run of the script itself (tiny widths)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
from _timing import median_seconds

from wanpack.convert.synth import random_block_weights, random_tensor
from wanpack.manifests.arch import component_tensors, encoder_config
from wanpack.runtime.models.clip import CLIPVision
from wanpack.runtime.models.t5 import T5Encoder


def matmul_ceiling(iters: int, device: str, n: int) -> float:
    """bf16 TFLOP/s of an n^3 matmul on this device, now."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / median_seconds(lambda: a @ b, iters, warmup=2, cuda=device != "cpu") / 1e12


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def measure(enc, w, x, ctx, iters: int, device: str) -> tuple[dict[str, float], float]:
    """Seconds per phase and per block, and the peak working memory (MiB) above what was allocated before."""
    gpu = device != "cpu"
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if gpu else 0
    times = {ph: median_seconds(lambda ph=ph: enc.phase(ph)(w, x, ctx), iters, warmup=2, cuda=device != "cpu") for ph in enc.phases}
    times["block"] = median_seconds(lambda: enc.block(w, x, ctx), iters, warmup=2, cuda=device != "cpu")
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if gpu else float("nan")
    return times, peak


def bench_encoder(name, enc_cls, cfg, inputs, flops, full_blocks, dtype, iters, device):
    """Rows for one encoder: per weight scheme, the phase and block times, TFLOP/s, peak memory, error vs fp32."""
    rows, specs = [], component_tensors(cfg)
    fp32 = enc_cls(cfg, dtype=torch.float32)
    fp32_w = random_block_weights(specs, 0, "fp32", device)
    non_block = {s.name: random_tensor(s, 0, torch.float32).to(device) for s in specs if s.block is None}
    x32, ctx = fp32.embed(non_block, *inputs)
    ref = fp32.block(fp32_w, x32, ctx) - x32
    del fp32_w
    for scheme in ("bf16", "int8", "fp8"):
        enc = enc_cls(cfg, dtype=dtype)
        w = random_block_weights(specs, 0, scheme, device)
        x = x32.to(dtype)
        times, peak = measure(enc, w, x, ctx, iters, device)
        err = rel_err(enc.block(w, x, ctx) - x, ref)
        rows.append({"encoder": name, "weights": scheme, **{f"{k}_ms": v * 1e3 for k, v in times.items()},
                     "block_tflops": flops / times["block"] / 1e12, "encoder_s": times["block"] * full_blocks,
                     "work_peak_mib": peak, "rel_err_vs_fp32": err})  # fmt: skip
        del w
    return rows


def t5_flops(cfg, batch: int, length: int) -> float:
    linear = 2 * batch * length * (4 * cfg.dim * cfg.dim_attn + 3 * cfg.dim * cfg.dim_ffn)
    return linear + 4 * batch * length * length * cfg.dim_attn


def clip_flops(cfg, batch: int) -> float:
    s = cfg.num_tokens
    return 2 * batch * s * (4 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.mlp_dim) + 4 * batch * s * s * cfg.dim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this path")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2, help="prompts per T5 batch (cond + uncond = 2)")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (smoke runs only)")
    args = parser.parse_args(argv)
    device = args.device
    if device != "cpu" and not torch.cuda.is_available():
        print("encoders_bench: no CUDA device - run on a GPU, or pass --device cpu --tiny for a smoke run",
              file=sys.stderr)  # fmt: skip
        return 1
    torch.manual_seed(0)
    scale = "tiny" if args.tiny else "full"
    ceiling = matmul_ceiling(args.iters, device, 512 if args.tiny else 8192)
    # Real widths, one block each; a 4096-row embedding table stands in for the 2 GiB one (the lookup is free).
    t5 = dataclasses.replace(encoder_config("t5", dim_scale=scale), vocab=4096 if not args.tiny else 512,
                             num_layers=1)  # fmt: skip
    clip = dataclasses.replace(encoder_config("clip", dim_scale=scale), num_layers=1, use_layers=1)
    length = t5.text_len
    ids = torch.randint(3, t5.vocab, (args.batch, length))
    mask = torch.ones_like(ids)
    mask[1:, length // 4 :] = 0  # later prompts are short, as real ones are
    image = torch.rand(1, 3, 480, 832) * 2 - 1

    rows = bench_encoder("umt5-xxl", T5Encoder, t5, (ids, mask), t5_flops(t5, args.batch, length), 24,
                         torch.bfloat16, args.iters, device)  # fmt: skip
    rows += bench_encoder("clip-vit-h", CLIPVision, clip, (image,), clip_flops(clip, 1), 31, torch.float16,
                          args.iters, device)  # fmt: skip
    name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    result = {"device": name, "torch": torch.__version__, "widths": scale, "matmul_bf16_tflops": ceiling,
              "t5_batch": args.batch, "t5_tokens": length, "rows": rows}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"{name}, torch {result['torch']}, {scale} widths; bf16 matmul ceiling {ceiling:.1f} TFLOP/s (same run)")
    print("phase ms: T5 attn ffn, CLIP attn mlp; whole s = block x 24 (T5) or x 31 (CLIP); peak MiB = working memory "
          "above the weights; err = rel L2 of one block's update vs fp32")
    print(f"{'encoder':<11} {'weights':<7} {'phase ms':<15} {'block ms':>8} {'TFLOP/s':>8} {'whole s':>8} "
          f"{'peak MiB':>8} {'err':>7}")  # fmt: skip
    for r in rows:
        phases = " ".join(f"{r[k]:.2f}" for k in r if k.endswith("_ms") and k != "block_ms")
        print(f"{r['encoder']:<11} {r['weights']:<7} {phases:<15} {r['block_ms']:>8.2f} {r['block_tflops']:>8.1f} "
              f"{r['encoder_s']:>8.3f} {r['work_peak_mib']:>8.0f} {r['rel_err_vs_fp32']:>7.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
