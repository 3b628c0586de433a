"""One Wan2.1-14B DiT block on a CUDA GPU: bf16 vs int8 vs fp8, per phase, against ceilings measured in the same run.

Prints the achieved TFLOP/s of each phase and of the block's linear work next to the card's measured bf16 matmul,
fp8 _scaled_mm, int8 _int_mm and SDPA rates; every attention backend's TFLOP/s at each --tokens (our quantized
``sage`` kernels included where the card has them) and each block's time with those forced (``--attn``); the peak
activation memory at 720p with chunking (goal <= 4 GiB); and a numerical check of each scheme's block output (and the
int8 block with each --attn backend) against fp32 at 14B shape. Random weights (synth's generator).

    python benchmarks/dit_bench.py --json dit_bench.json          # ~2-4 minutes on an H100
    python benchmarks/dit_bench.py --tokens 32760 --iters 2       # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _timing import median_seconds

from wanpack.convert.synth import random_block_weights
from wanpack.manifests.arch import dit_config, dit_tensors
from wanpack.runtime.models import dit
from wanpack.runtime.ops import attention as attn_ops
from wanpack.runtime.ops import linear as lin
from wanpack.runtime.ops.report import report_backends

GIB = 2**30
SCHEMES = ("bf16", "int8", "fp8")


# ------------------------------------------------------------------------------------------------ ceilings


def ceilings(dev, iters: int, small: bool = False) -> dict[str, float]:
    """Dense TFLOP/s of the card's best primitives at a big square GEMM and the 480p attention shape."""
    m = n = k = 256 if small else 8192
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    flops = 2 * m * n * k
    out = {"bf16 matmul": flops / median_seconds(lambda: a @ b.t(), iters) / 1e12}
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
    for fast in (True, False):
        def fp8(fast=fast):
            return torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                    use_fast_accum=fast and dev.type == "cuda")  # fmt: skip

        out[f"fp8 _scaled_mm{' fast-accum' if fast else ''}"] = flops / median_seconds(fp8, iters) / 1e12
    ai = torch.randint(-127, 127, (m, k), device=dev, dtype=torch.int8)
    bi = torch.randint(-127, 127, (n, k), device=dev, dtype=torch.int8)
    out["int8 _int_mm"] = flops / median_seconds(lambda: torch._int_mm(ai, bi.t()), iters) / 1e12
    L, H, D = (512, 2, 32) if small else (32760, 40, 128)
    q, kk, v = (torch.randn(1, L, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    for name in ("cudnn", "flash", "sdpa"):
        backend = attn_ops.BACKENDS[name]
        if backend.unavailable(dev) is None:
            try:
                secs = median_seconds(lambda b=backend: b.run(q, kk, v), iters)
                out[f"attention {name}"] = 4 * L * L * H * D / secs / 1e12
            except Exception as exc:  # a backend may reject the shape on some cards
                print(f"attention {name} failed: {exc!r}", file=sys.stderr)
    return out


def attention_rates(dev, lengths: list[int], iters: int, small: bool = False) -> dict[str, dict[str, float]]:
    """{backend: {tokens: TFLOP/s}} of every attention backend this card has, at each self-attention length (14B:
    40 heads x 128, batch 1). Quantizing backends get a K/V-prepared dict, as a block's query chunks share one K/V."""
    heads, hd = (2, 32) if small else (40, 128)
    out: dict[str, dict[str, float]] = {}
    for n in lengths:
        qkv = tuple(torch.randn(1, n, heads, hd, device=dev, dtype=torch.bfloat16) for _ in range(3))
        for name, backend in attn_ops.BACKENDS.items():
            if backend.unavailable(dev) is not None or not backend.takes(qkv[0]):
                continue
            try:
                prepared: dict = {}
                secs = median_seconds(lambda b=backend, p=prepared, x=qkv: b.run(*x, p), iters)
                out.setdefault(name, {})[str(n)] = 4 * n * n * heads * hd / secs / 1e12
            except Exception as exc:  # one backend's failure must not lose the others
                print(f"attention {name} at {n} failed: {exc!r}", file=sys.stderr)
    return out


def sage_variants(dev) -> list[str]:
    """Our quantized attention backends this device can run (the default extra --attn axis)."""
    return [n for n in ("sage", "sage-pv16") if attn_ops.BACKENDS[n].unavailable(dev) is None]


def time_block_with(attn: str, cfg, w, n: int, dev, opts, iters: int) -> dict[str, float] | str:
    """:func:`time_block` with attention forced to ``attn`` (a failure comes back as its message)."""
    attn_ops.set_attn_backend(attn)
    try:
        return time_block(cfg, w, n, dev, opts, iters)
    except Exception as exc:
        print(f"block with attention {attn} at {n} failed: {exc!r}", file=sys.stderr)
        return f"{exc!r}"[:300]
    finally:
        attn_ops.set_attn_backend(None)


# ------------------------------------------------------------------------------------------------ weights


def block_weights(cfg, dev, scheme: str) -> dict[str, torch.Tensor]:
    """Block 0 of the config on the GPU: bf16, int8/fp8 Linears + scales as a pack holds them, or all fp32."""
    return random_block_weights(dit_tensors(cfg), 0, scheme, dev)


def block_inputs(cfg, n: int, dev, opts, seed: int = 1):
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(1, n, cfg.dim, device=dev, generator=gen)
    e0 = 0.3 * torch.randn(1, 6, cfg.dim, device=dev, generator=gen)
    ctx = torch.randn(1, cfg.text_len, cfg.dim, device=dev, generator=gen).to(opts.dtype)
    return x, e0, ctx


def grid_for(n: int) -> tuple[int, int, int]:
    known = {32760: (21, 30, 52), 75600: (21, 45, 80)}
    return known.get(n, (n // 1024, 32, 32) if n % 1024 == 0 else (1, 1, n))


# ------------------------------------------------------------------------------------------------ measurements


def phase_flops(cfg, n: int) -> dict[str, dict[str, float]]:
    d, f, c = cfg.dim, cfg.ffn_dim, cfg.text_len
    return {
        "self_attn": {"linear": 4 * 2 * n * d * d, "attention": 4 * n * n * d},
        "cross_attn": {"linear": 2 * 2 * n * d * d, "attention": 4 * n * c * d},  # K/V cached: not per step
        "ffn": {"linear": 2 * 2 * n * d * f, "attention": 0},
    }


def time_block(cfg, w, n: int, dev, opts, iters: int) -> dict[str, float]:
    """Median seconds of each phase at n tokens (the residual keeps accumulating; only the time matters)."""
    x0, e0, ctx = block_inputs(cfg, n, dev, opts)
    rope = dit.rope_tables(grid_for(n), cfg.head_dim, dtype=opts.hi, device=dev)
    kv = dit.cross_kv(w, ctx, cfg, opts)
    x = x0.clone()
    holder = {}
    phases = {
        "self_attn": lambda: holder.__setitem__("mod", dit.self_attn_phase(w, x, e0, rope, cfg, opts)),
        "cross_attn": lambda: dit.cross_attn_phase(w, x, kv, cfg, opts),
        "ffn": lambda: dit.ffn_phase(w, x, holder["mod"], cfg, opts),
    }
    phases["self_attn"]()
    return {name: median_seconds(fn, iters) for name, fn in phases.items()}


def time_linears(cfg, w, n: int, dev, opts, iters: int) -> float:
    """Seconds for all per-step GEMMs of a block at n tokens, chunked as the block runs them (quant + epilogue in)."""
    x = torch.randn(opts.chunk_tokens, cfg.dim, device=dev, dtype=opts.dtype)
    h = torch.randn(opts.chunk_tokens, cfg.ffn_dim, device=dev, dtype=opts.dtype)
    names = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o", "ffn.0"]

    def run():
        for s in dit.token_chunks(n, opts.chunk_tokens):
            rows = s.stop - s.start
            for name in names:
                dit._lin(w, name, x[:rows])
            dit._lin(w, "ffn.2", h[:rows])

    return median_seconds(run, iters)


def time_norm_linears(cfg, w, n: int, dev, opts, iters: int) -> float:
    """Median seconds of :func:`wired_pass`."""
    return median_seconds(wired_pass(cfg, w, n, dev, opts), iters)


def wired_pass(cfg, w, n: int, dev, opts):
    """A function that runs a block's per-step GEMMs with the producers of their inputs once, wired as the block
    wires them (inputs are made here, outside it): the three modulated LayerNorms and norm3 feed q/k/v, cross q and ffn.0 (k and v share one input), the tanh
    GELU feeds ffn.2, the attention outputs feed the o projections as plain tensors. With W8A8 weights on CUDA the
    norm kernels write the quantized copies themselves (and skip the 16-bit outputs nobody reads); bf16 pays the
    same norms and GELU unquantized, so the ratio compares like with like."""
    x = torch.randn(1, opts.chunk_tokens, cfg.dim, device=dev, dtype=opts.hi)
    shift, scale = (0.3 * torch.randn(1, 2, cfg.dim, device=dev, dtype=opts.hi)).chunk(2, dim=1)
    n3w, n3b = w["norm3.weight"], w["norm3.bias"]
    o = torch.randn(1, opts.chunk_tokens, cfg.dim, device=dev, dtype=opts.dtype)
    groups = [("self_attn.k", "self_attn.v"), ("self_attn.q",), ("ffn.0",)]

    def run():
        for s in dit.token_chunks(n, opts.chunk_tokens):
            rows = s.stop - s.start
            for names in groups:
                xn = dit._modulated_norm_for(w, names, x[:, :rows], shift, scale, cfg.eps, opts)
                outs = [dit._lin(w, name, xn) for name in names]
            xn = dit._norm_for(w, ("cross_attn.q",), x[:, :rows], cfg.eps, opts, weight=n3w, bias=n3b)
            dit._lin(w, "cross_attn.q", xn)
            for name in ("self_attn.o", "cross_attn.o"):
                dit._lin(w, name, o[:, :rows])
            dit._lin(w, "ffn.2", torch.nn.functional.gelu(outs[0], approximate="tanh"))  # outs[0]: ffn.0's output

    return run


def peak_activation(cfg, w, n: int, dev, opts) -> tuple[int, int]:
    """(measured, estimated) peak bytes above the resident weights for one block at n tokens."""
    f, hh, ww = grid_for(n)
    quantized = dev.type == "cuda" and attn_ops.attn_backend(dev).quantized
    estimated = dit.activation_memory(cfg, (f, hh * 2, ww * 2), opts=opts, quantized_attention=quantized)["peak"]
    if dev.type != "cuda":
        return -1, estimated
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    x, e0, ctx = block_inputs(cfg, n, dev, opts)
    rope = dit.rope_tables(grid_for(n), cfg.head_dim, dtype=opts.hi, device=dev)
    kv = dit.cross_kv(w, ctx, cfg, opts)
    del ctx
    dit.block_forward(w, x, e0, rope, kv, cfg, opts)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(dev) - base, estimated


def smoke_gemm(scheme: str, smoke: bool) -> str | None:
    """On the CPU smoke run, force the W8A8 backends so their code paths run too."""
    return {"int8": "int_mm", "fp8": "scaled_mm"}.get(scheme) if smoke else None


def numerics(cfg, dev, n: int, opts, smoke: bool = False, attns: tuple[str, ...] = ()) -> dict[str, float]:
    """Relative error (Frobenius) of each scheme's block update against fp32 weights and activations, on the GPU;
    ``attns`` adds the int8 block with each of those attention backends forced ('int8+sage')."""
    ref_opts = dit.DiTOptions(dtype=torch.float32, chunk_tokens=opts.chunk_tokens)
    lin.set_gemm_backend(None)
    torch.backends.cuda.matmul.allow_tf32 = False
    w32 = block_weights(cfg, dev, "fp32")
    x, e0, ctx = block_inputs(cfg, n, dev, ref_opts)
    rope = dit.rope_tables(grid_for(n), cfg.head_dim, device=dev)
    ref = dit.block_forward(w32, x.clone(), e0, rope, dit.cross_kv(w32, ctx, cfg, ref_opts), cfg, ref_opts) - x
    del w32
    errs = {}
    for scheme, attn in [(s, None) for s in SCHEMES] + [("int8", a) for a in attns]:
        lin.set_gemm_backend(smoke_gemm(scheme, smoke))
        attn_ops.set_attn_backend(attn)
        w = block_weights(cfg, dev, scheme)
        try:
            kv = dit.cross_kv(w, ctx.to(opts.dtype), cfg, opts)
            got = dit.block_forward(w, x.clone(), e0, rope, kv, cfg, opts) - x
            errs[scheme + (f"+{attn}" if attn else "")] = ((got - ref).norm() / ref.norm()).item()
        except Exception as exc:  # an extra attention backend failing must not lose the scheme numbers
            print(f"numerics {scheme} with attention {attn} failed: {exc!r}", file=sys.stderr)
        finally:
            attn_ops.set_attn_backend(None)
        del w
    return errs


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32760, 75600])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--chunk-tokens", type=int, default=None, help="default: from the memory budget")
    ap.add_argument("--check-tokens", type=int, default=4096, help="sequence length of the fp32 numerical check")
    ap.add_argument("--json", default=None)
    ap.add_argument("--attn", nargs="*", default=None,
                    help="attention backends to also time whole blocks with (default: the sage variants this GPU "
                         "has; pass none to skip)")  # fmt: skip
    ap.add_argument("--smoke", action="store_true", help="tiny widths on CPU: checks the script, measures nothing")
    ap.add_argument("--profile", action="store_true",
                    help="also list where one wired pass spends its kernel time, per scheme, at the first --tokens")  # fmt: skip
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("dit_bench needs a CUDA GPU (or --smoke on CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.smoke else "cuda")
    t_start = time.time()
    cfg = dit_config("wan2.1-t2v-14b", layers=1, dim_scale="tiny" if args.smoke else "full")
    opts = dit.DiTOptions(dtype=torch.bfloat16, chunk_tokens=args.chunk_tokens or dit.chunk_tokens_for(cfg))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)"
    result = {"device": name, "torch": torch.__version__, "date": time.strftime("%F"),
              "chunk_tokens": opts.chunk_tokens, "backends": report_backends(dev)}  # fmt: skip
    print(f"# {result['device']}, torch {result['torch']}, chunk {opts.chunk_tokens} tokens, backends "
          f"{result['backends']}", file=sys.stderr)  # fmt: skip
    result["ceilings_tflops"] = ceil = ceilings(dev, args.iters, small=args.smoke)
    print(f"# ceilings (TFLOP/s): {json.dumps({k: round(v) for k, v in ceil.items()})}", file=sys.stderr)
    result["attention_tflops"] = attention_rates(dev, args.tokens, args.iters, small=args.smoke)
    print(f"# attention (TFLOP/s): {json.dumps(result['attention_tflops'])}", file=sys.stderr)
    extra_attn = tuple(sage_variants(dev) if args.attn is None else args.attn)
    rows, mem = [], {}
    int8_variants = [b for b in ("triton", "int_mm", "sgl") if lin.BACKENDS[b].unavailable(dev) is None]
    fp8_variants = ["fast", "exact"] if dev.type == "cuda" else ["exact"]
    for scheme in SCHEMES:
        lin.set_gemm_backend(smoke_gemm(scheme, args.smoke))
        w = block_weights(cfg, dev, scheme)
        for n in args.tokens:
            fl = phase_flops(cfg, n)
            times = time_block(cfg, w, n, dev, opts, args.iters)
            lin_times = {}
            variants = {"int8": int8_variants, "fp8": fp8_variants}.get(scheme, ["matmul"])
            for var in variants:
                if scheme == "int8":
                    lin.set_gemm_backend(var)
                if scheme == "fp8":
                    lin.FP8_FAST_ACCUM = var == "fast"
                lin_times[var] = time_linears(cfg, w, n, dev, opts, args.iters)
            lin.set_gemm_backend(smoke_gemm(scheme, args.smoke))
            lin.FP8_FAST_ACCUM = True
            norm_lin_s = time_norm_linears(cfg, w, n, dev, opts, args.iters)
            if args.profile and n == args.tokens[0]:
                result.setdefault("profile_ms", {})[scheme] = profile_wired(cfg, w, n, dev, opts)
            lin_flops = sum(p["linear"] for p in fl.values())
            row = {"scheme": scheme, "tokens": n, "block_s": sum(times.values()), "linear_s": lin_times,
                   "linear_tflops": {k: lin_flops / v / 1e12 for k, v in lin_times.items()},
                   "norm_linear_s": norm_lin_s}  # fmt: skip
            for ph, t in times.items():
                row[f"{ph}_s"] = t
                row[f"{ph}_tflops"] = (fl[ph]["linear"] + fl[ph]["attention"]) / t / 1e12
            row["block_s_by_attn"] = {}
            for attn in extra_attn:
                with_attn = time_block_with(attn, cfg, w, n, dev, opts, args.iters)
                row["block_s_by_attn"][attn] = with_attn if isinstance(with_attn, str) else sum(with_attn.values())
            rows.append(row)
            print(f"# {scheme} {n}: block {row['block_s']:.3f} s, linears {lin_times}, wired linears (norms, GELU "
                  f"and quantizers in) {norm_lin_s:.3f} s", file=sys.stderr)  # fmt: skip
        if 75600 in args.tokens:
            mem[scheme] = peak_activation(cfg, w, 75600, dev, opts)
        del w
        torch.cuda.empty_cache()
    result["rows"], result["peak_activation_720p"] = rows, mem
    result["numerics_rel_err"] = numerics(cfg, dev, args.check_tokens, opts, args.smoke, extra_attn)
    result["wall_s"] = time.time() - t_start
    print_table(result)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


def profile_wired(cfg, w, n: int, dev, opts, top: int = 8) -> dict[str, float]:
    """Milliseconds per kernel (device time; CPU op time on the smoke run) of one wired pass, the largest first."""
    activity = torch.profiler.ProfilerActivity.CUDA if dev.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    run = wired_pass(cfg, w, n, dev, opts)
    run()  # warm: autotuning and self-checks stay out of the profile
    with torch.profiler.profile(activities=[activity]) as prof:
        run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    for ev in prof.key_averages():
        t = ev.self_device_time_total if dev.type == "cuda" else ev.self_cpu_time_total
        if t > 0:
            per_kernel[ev.key[:80]] = per_kernel.get(ev.key[:80], 0.0) + t / 1e3  # us -> ms
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])
    out = dict(ranked[:top])
    out["(total)"] = sum(per_kernel.values())
    return out


def print_table(r: dict) -> None:
    ceil = r["ceilings_tflops"]
    print(f"\nDiT block, Wan2.1-14B shape, {r['device']} ({r['date']}, torch {r['torch']}), "
          f"chunk {r['chunk_tokens']} tokens, backends {r['backends']}")  # fmt: skip
    print("ceilings TFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in ceil.items()))
    print(f"{'scheme':6} {'tokens':>6} {'self_attn':>16} {'cross_attn':>16} {'ffn':>16} {'block s':>8} {'vs bf16':>7}"
          f" {'wired lin s':>16}  linears s (TFLOP/s) [vs bf16]")  # fmt: skip
    base = {(x["tokens"]): x for x in r["rows"] if x["scheme"] == "bf16"}
    for x in r["rows"]:
        b = base.get(x["tokens"])
        cells = [f"{x[p + '_s'] * 1e3:7.1f}ms {x[p + '_tflops']:5.0f}T" for p in ("self_attn", "cross_attn", "ffn")]
        ratio = x["block_s"] / b["block_s"] if b else float("nan")
        b_lin = min(b["linear_s"].values()) if b else float("nan")
        nl = x.get("norm_linear_s", float("nan"))
        nl_ratio = nl / b["norm_linear_s"] if b and "norm_linear_s" in b else float("nan")
        nl_cell = f"{nl:.3f} [{nl_ratio:.2f}x]"
        lins = " ".join(f"{k}={v:.3f}({x['linear_tflops'][k]:.0f})[{v / b_lin:.2f}x]" for k, v in x["linear_s"].items())
        print(f"{x['scheme']:6} {x['tokens']:>6} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} {x['block_s']:8.3f} "
              f"{ratio:7.2f} {nl_cell:>16}  {lins}")  # fmt: skip
    attn_rates = r.get("attention_tflops", {})
    if attn_rates:
        print("attention TFLOP/s (40 heads x 128, K/V prepared once): " + "; ".join(
            f"{name} " + ", ".join(f"{n}: {v:.0f}" for n, v in by_n.items()) for name, by_n in attn_rates.items()))  # fmt: skip
    for x in r["rows"]:
        b = base.get(x["tokens"])
        for attn, secs in x.get("block_s_by_attn", {}).items():
            cell = (f"{secs:.3f} s [{secs / b['block_s']:.2f}x bf16 block, {secs / x['block_s']:.2f}x own]"
                    if isinstance(secs, float) and b else str(secs))  # fmt: skip
            print(f"block with attention {attn}: {x['scheme']} {x['tokens']}: {cell}")
    for scheme, (meas, est) in r["peak_activation_720p"].items():
        flag = "ok" if meas <= 4 * GIB else "OVER 4 GiB"
        print(f"peak activation 720p {scheme}: {meas / GIB:.2f} GiB measured, {est / GIB:.2f} GiB estimated ({flag})")
    print("block update rel err vs fp32 (14B shape): " + ", ".join(f"{k} {v:.4f}"
                                                                   for k, v in r["numerics_rel_err"].items()))
    for scheme, kernels in r.get("profile_ms", {}).items():
        print(f"kernel time of one wired pass, {scheme}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in kernels.items()))
    print(f"wall {r['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
