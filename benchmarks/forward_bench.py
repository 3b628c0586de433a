"""A whole resident Wan2.1-14B DiT forward at 480p on a CUDA GPU: ours (int8 / bf16, each attention backend) against
diffusers' WanTransformer3DModel in bf16, in one process on one card.

What is timed, per variant: one forward of the 40 blocks at 480p x 81 frames (21 x 60 x 104 latents, 32760 tokens)
with a 512-token prompt, median of --iters after a warm-up; ours in token chunks of --chunk-tokens (default 8192,
the longest the planner picks, which it does at 480p on an 8 GiB budget too). Ours is timed with the cross-attention K/V already cached,
as every denoising step after the first runs (``wanpack run`` computes them once per prompt), and once with a cold
cache; diffusers recomputes them on every call, as it ships. diffusers runs with its default attention (PyTorch
SDPA's own choice) and with SDPA forced to cuDNN, the strongest exact kernel on Hopper.

Weights are random: the 40 blocks of each model share one block's tensors (time does not depend on the values, and
one block's weights keep the run inside one card's memory next to the other model). Needs diffusers (pure Python;
carry its wheel to a machine without it).

    python benchmarks/forward_bench.py --json forward_bench.json      # ~2 minutes on an H200
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _timing import median_seconds

from wanpack.convert.synth import random_block_weights, random_tensor
from wanpack.manifests.arch import dit_config, dit_tensors
from wanpack.runtime.models import dit
from wanpack.runtime.ops import attention as attn_ops
from wanpack.runtime.stream.planner import MAX_CHUNK

LATENT = (21, 60, 104)  # 480 x 832, 81 frames
TEXT_TOKENS = 512
SMOKE_LATENT = (3, 8, 12)  # --smoke: CPU, tiny widths, 2 blocks, 72 tokens


def our_weights(cfg, scheme: str, dev) -> dict[str, torch.Tensor]:
    """Full original names; every block points at block 0's tensors (int8 Linears + scales as a pack holds them)."""
    specs = dit_tensors(cfg)
    block = random_block_weights(specs, 0, scheme, dev)
    out = {f"blocks.{i}.{name}": t for i in range(cfg.num_layers) for name, t in block.items()}
    for spec in specs:
        if spec.block is None:
            out[spec.name] = random_tensor(spec, 0, torch.float32).to(dev, torch.bfloat16)
    return out


def diffusers_model(cfg, dev):
    """WanTransformer3DModel of the 14B shape in bf16 on the GPU, its 40 blocks sharing one block's weights."""
    from diffusers import WanTransformer3DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = WanTransformer3DModel(
                patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=cfg.eps,
            )  # fmt: skip
    finally:
        torch.set_default_dtype(default)
    model.blocks = torch.nn.ModuleList([model.blocks[0]] * cfg.num_layers)
    return model.eval()


def inputs(cfg, dev, latent):
    """bf16 latents and prompt embedding (what both models are called with), and a timestep."""
    gen = torch.Generator(device=dev).manual_seed(0)
    lat = torch.randn(1, cfg.in_dim, *latent, device=dev, generator=gen).bfloat16()
    text = torch.randn(1, TEXT_TOKENS, cfg.text_dim, device=dev, generator=gen).bfloat16()
    return lat, torch.tensor([937.0], device=dev), text


def time_ours(cfg, weights, lat, t, text, attn: str, iters: int, opts) -> dict[str, float | str]:
    attn_ops.set_attn_backend(attn)
    try:
        cache: dict = {}
        t0 = time.perf_counter()
        with torch.no_grad():
            dit.forward(weights, cfg, lat, t, text, kv_cache=cache, opts=opts)
        if lat.is_cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0

        def step():
            with torch.no_grad():
                dit.forward(weights, cfg, lat, t, None, kv_cache=cache, opts=opts)

        def cold_step():
            with torch.no_grad():
                dit.forward(weights, cfg, lat, t, text, opts=opts)

        warm = median_seconds(step, iters)
        cold = median_seconds(cold_step, 1, warmup=0)
        ran = attn_ops.attn_backend(lat.device).name
        return {"forward_s": warm, "cold_cache_s": cold, "first_call_s": first, "attention": ran}
    except Exception as exc:  # one variant's failure must not lose the others
        print(f"ours with {attn} failed: {exc!r}", file=sys.stderr)
        return {"error": f"{exc!r}"[:300]}
    finally:
        attn_ops.set_attn_backend(None)


def time_diffusers(model, lat, t, text, iters: int, backend: str) -> dict[str, float | str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call():
        with torch.no_grad():
            model(lat, t, text, return_dict=False)

    try:
        if backend == "cudnn":
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return {"forward_s": median_seconds(call, iters)}
        return {"forward_s": median_seconds(call, iters)}
    except Exception as exc:
        print(f"diffusers with {backend} failed: {exc!r}", file=sys.stderr)
        return {"error": f"{exc!r}"[:300]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="wan2.1-t2v-14b")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--attn", default="auto,cudnn", help="our attention backends to time, comma-separated")
    ap.add_argument("--schemes", default="int8,bf16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--chunk-tokens", type=int, default=MAX_CHUNK,
                    help="our token chunk (default: the planner's longest, what `wanpack run` uses where it fits)")
    ap.add_argument("--smoke", action="store_true", help="tiny 2-block model on the CPU: checks the code paths only")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("forward_bench needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cfg = dit_config(args.arch, layers=2, dim_scale="tiny") if args.smoke else dit_config(args.arch)
    latent = SMOKE_LATENT if args.smoke else LATENT
    lat, t, text = inputs(cfg, dev, latent)
    opts = dit.DiTOptions(chunk_tokens=args.chunk_tokens)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"device": name, "arch": args.arch, "latent": latent, "smoke": args.smoke,
              "tokens": latent[0] * latent[1] // 2 * latent[2] // 2, "chunk_tokens": opts.chunk_tokens,
              "torch": torch.__version__, "diffusers": {}, "ours": {}}  # fmt: skip
    try:
        import diffusers

        result["diffusers_version"] = diffusers.__version__
        model = diffusers_model(cfg, dev)
        for backend in ("default", "cudnn") if dev.type == "cuda" else ("default",):
            result["diffusers"][backend] = time_diffusers(model, lat, t, text, args.iters, backend)
            print("diffusers", backend, result["diffusers"][backend], file=sys.stderr)
        del model
    except ImportError as exc:
        result["diffusers"] = {"skipped": f"{exc!r}"}
    torch.cuda.empty_cache()
    for scheme in args.schemes.split(","):
        weights = our_weights(cfg, scheme, dev)
        for attn in args.attn.split(","):
            result["ours"][f"{scheme}+{attn}"] = time_ours(cfg, weights, lat, t, text, attn, args.iters, opts)
            print("ours", scheme, attn, result["ours"][f"{scheme}+{attn}"], file=sys.stderr)
        del weights
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result)
    return 0


def print_table(r: dict) -> None:
    base = r["diffusers"].get("default", {}).get("forward_s") if isinstance(r["diffusers"], dict) else None
    print(f"{r['device']} - {r['arch']} at {r['latent']} ({r['tokens']} tokens), chunk {r['chunk_tokens']}")
    rows = [(f"diffusers bf16 ({k} SDPA)", v) for k, v in r["diffusers"].items() if isinstance(v, dict)]
    rows += [(f"wanpack {k}", v) for k, v in r["ours"].items()]
    for name, v in rows:
        if "forward_s" not in v:
            print(f"{name:34} {v.get('error', v)}")
            continue
        ratio = f"{v['forward_s'] / base:.3f}x" if base else "-"
        extra = f" cold cache {v['cold_cache_s']:.3f} s, attention {v['attention']}" if "cold_cache_s" in v else ""
        print(f"{name:34} {v['forward_s']:7.3f} s  {ratio:>7} of diffusers default{extra}")


if __name__ == "__main__":
    sys.exit(main())
