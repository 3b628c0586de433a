"""One Wan2.1-14B block, int8 weights and sage attention, with and without the fused epilogues, in one process.

The fused path is what `wanpack run` does: the gated residual adds inside the int8 GEMM's epilogue
(``linear.linear_add_``) and the FFN's GELU inside ffn.2's quantizer (``activations.gelu_quantized``). The unfused
path is the GEMM into bf16 then ``add_scaled_``, and torch's GELU then the quantizer. Both against bf16 weights with
cuDNN attention (the issue-13 block ratio's denominator), at the chunk lengths `wanpack run` plans (8190-token chunks
at 480p, 7560 at 720p). Then a kernel profile of the fused block at the first length.

    python benchmarks/block_fusions.py                      # ~1-2 minutes on an H200
    python benchmarks/block_fusions.py --smoke              # tiny widths on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

import torch
from _timing import median_seconds
from dit_bench import block_inputs, block_weights, grid_for

from wanpack.manifests.arch import dit_config
from wanpack.runtime.models import dit
from wanpack.runtime.ops import activations
from wanpack.runtime.ops import attention as attn_ops
from wanpack.runtime.ops import linear as lin

CHUNKS = {32760: 8192, 75600: 7560}  # what the run planner picks on an 8 GiB budget (docs/STREAMING.md)


@contextlib.contextmanager
def unfused():
    """The block as it ran before the fused epilogues: no backend adds into the stream, no fused GELU."""
    saved = dict(lin.BACKENDS)
    lin.BACKENDS.update({k: dataclasses.replace(b, add_into=None) for k, b in lin.BACKENDS.items()})
    lin._chosen.clear()
    fused_gelu = activations.fused_gelu_quant
    activations.fused_gelu_quant = lambda device, width: False
    try:
        yield
    finally:
        lin.BACKENDS.clear()
        lin.BACKENDS.update(saved)
        lin._chosen.clear()
        activations.fused_gelu_quant = fused_gelu


def residual_gemms(dev, iters: int) -> None:
    """The residual add alone, per GEMM shape of a 480p / 720p chunk: the GEMM into bf16 then add_scaled_, against
    the fused epilogue with the stream's tile moved by the threads or by TMA; error against the exact product."""
    from wanpack.runtime.ops import triton_kernels as tk

    print(f"{'rows':>5} {'K':>6} {'N':>5} {'unfused ms':>10} {'fused threads':>13} {'fused TMA':>9} "
          f"{'err unfused':>11} {'err threads':>11} {'err TMA':>8}")
    gen = torch.Generator(device=dev).manual_seed(0)
    for m, k, n in ((8190, 5120, 5120), (8190, 13824, 5120), (7560, 5120, 5120), (7560, 13824, 5120)):
        q = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=gen)
        s = torch.rand(m, 1, device=dev, generator=gen) / 3000
        ws = torch.rand(n, 1, device=dev, generator=gen) / 3000
        bias = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)
        gate = torch.randn(1, 1, n, device=dev, generator=gen)
        x0 = torch.randn(1, m, n, device=dev, generator=gen)
        exact = torch._int_mm(q, w.t()).double() * s.double() * ws.double().t() + bias.double()
        ref = x0.double() + gate.double() * exact[None]

        operands = (q, s, w, ws, bias)

        def unfused_add(x, ops=operands, gate=gate):
            lin.add_scaled_(x, tk.int8_gemm(*ops, torch.bfloat16)[None], gate)

        def fused_add(x, ops=operands, gate=gate):
            tk.int8_gemm_add_(x, *ops, gate)

        times, errs = [], []
        for fn, by_tma in ((unfused_add, None), (fused_add, False), (fused_add, True)):
            if by_tma is not None:
                tk.STREAM_BY_TMA = by_tma
            x = x0.clone()
            fn(x)  # the first call tunes (and must still add once)
            errs.append(((x.double() - ref).abs().max() / ref.abs().max()).item())
            times.append(median_seconds(lambda f=fn, y=x: f(y), iters) * 1e3)
        tk.STREAM_BY_TMA = True
        print(f"{m:5} {k:6} {n:5} {times[0]:10.3f} {times[1]:13.3f} {times[2]:9.3f} {errs[0]:11.2e} {errs[1]:11.2e} "
              f"{errs[2]:8.2e}")  # fmt: skip


def block_call(cfg, w, n: int, dev, opts):
    """A callable running one block in place on fresh inputs (made here, outside whatever times the call)."""
    x, e0, ctx = block_inputs(cfg, n, dev, opts)
    rope = dit.rope_tables(grid_for(n), cfg.head_dim, dtype=opts.hi, device=dev)
    kv = dit.cross_kv(w, ctx, cfg, opts)
    return lambda: dit.block_forward(w, x, e0, rope, kv, cfg, opts)


def block_seconds(cfg, w, n: int, dev, opts, iters: int) -> float:
    return median_seconds(block_call(cfg, w, n, dev, opts), iters)


def block_output(cfg, w, n: int, dev, opts) -> torch.Tensor:
    x, e0, ctx = block_inputs(cfg, n, dev, opts, seed=3)
    rope = dit.rope_tables(grid_for(n), cfg.head_dim, dtype=opts.hi, device=dev)
    return dit.block_forward(w, x, e0, rope, dit.cross_kv(w, ctx, cfg, opts), cfg, opts)


def profile(cfg, w, n: int, dev, opts, top: int = 14) -> list[tuple[str, float]]:
    """(kernel name, ms) of one fused block, largest first, device time (inputs made before the profile)."""
    run = block_call(cfg, w, n, dev, opts)
    run()
    activity = torch.profiler.ProfilerActivity.CUDA if dev.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        run()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    rows = []
    for ev in prof.key_averages():
        us = ev.device_time_total if dev.type == "cuda" else ev.cpu_time_total
        if us > 0 and (dev.type != "cuda" or ev.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((ev.key[:70], us / 1e3))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32760, 75600])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny widths on CPU: checks the script, measures nothing")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("block_fusions needs a CUDA GPU (or --smoke on CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.smoke else "cuda")
    cfg = dit_config("wan2.1-t2v-14b", layers=1, dim_scale="tiny" if args.smoke else "full")
    tokens = [256] if args.smoke else args.tokens
    if not args.smoke:
        residual_gemms(dev, 20)
    w8 = block_weights(cfg, dev, "int8")
    w16 = block_weights(cfg, dev, "bf16")
    print(f"{'tokens':>6} {'chunk':>5} {'bf16+cudnn':>10} {'int8+sage unfused':>17} {'fused':>8} "
          f"{'fused/unfused':>13} {'fused/bf16':>10} {'unfused/bf16':>12} {'out diff':>9}")
    for n in tokens:
        opts = dit.DiTOptions(dtype=torch.bfloat16, chunk_tokens=CHUNKS.get(n, 128))
        attn_ops.set_attn_backend(None if args.smoke else "cudnn")
        t16 = block_seconds(cfg, w16, n, dev, opts, args.iters)
        attn_ops.set_attn_backend(None if args.smoke else "sage")
        lin.set_gemm_backend(None if args.smoke else "triton")
        t_fused = block_seconds(cfg, w8, n, dev, opts, args.iters)
        y_fused = block_output(cfg, w8, n, dev, opts)
        with unfused():
            t_unfused = block_seconds(cfg, w8, n, dev, opts, args.iters)
            y_unfused = block_output(cfg, w8, n, dev, opts)
        diff = ((y_fused - y_unfused).norm() / y_unfused.norm()).item()
        print(f"{n:6} {opts.chunk_tokens:5} {t16 * 1e3:8.1f}ms {t_unfused * 1e3:15.1f}ms {t_fused * 1e3:6.1f}ms "
              f"{t_fused / t_unfused:13.3f} {t_fused / t16:10.3f} {t_unfused / t16:12.3f} {diff:9.2e}")  # fmt: skip
    n = tokens[0]
    opts = dit.DiTOptions(dtype=torch.bfloat16, chunk_tokens=CHUNKS.get(n, 128))
    kernels = profile(cfg, w8, n, dev, opts, top=40)
    total = sum(ms for _, ms in kernels)
    print(f"kernels of one fused int8 + sage block at {n} tokens (ms, device time; all kernels {total:.2f}):")
    for name, ms in kernels[:14]:
        print(f"  {ms:8.2f}  {name}")
    attn_ops.set_attn_backend(None)
    lin.set_gemm_backend(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
