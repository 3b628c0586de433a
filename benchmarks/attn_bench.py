"""Attention at Wan 14B's self-attention sizes on one CUDA GPU: throughput and accuracy of each kernel, same inputs.

Variants: cuDNN SDPA, flash SDPA, torch's default SDPA, our quantized kernel (runtime/ops/sage_attention.py) with fp8
and with 16-bit P.V, and the sageattention / flash-attn packages when installed. Per variant and sequence length:
TFLOP/s (4 * L^2 * H * D per call; median of --iters calls timed with CUDA events), and cosine similarity, relative
L2 error and the worst per-(token, head) cosine against fp32 attention of the same bf16 inputs (realistic_qkv: K with
biased and wide channels) on a sample of query rows. Our kernel is timed per call with its K/V pre-pass and with K/V
prepared once (how a DiT block calls it: one K/V, many query chunks); the pre-pass, the first call (Triton compile
+ autotuning) and the configs the autotuner chose are reported too. Each variant runs in its own try block: one
failure is recorded and the others still run. The table comes last.

    python benchmarks/attn_bench.py --json attn.json      # H100/H200: about 2 minutes, autotuning included
    python benchmarks/attn_bench.py --smoke               # CPU, Triton interpreter, tiny shapes: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
from _timing import median_seconds

from wanpack.runtime.ops import attention as attn


def sdpa_with(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return attn._sdpa(q, k, v)

    return run


def variants(dev: torch.device, smoke: bool) -> dict[str, object]:
    """name -> a function of (q, k, v, prepared-dict), or the reason it cannot run here."""
    from torch.nn.attention import SDPBackend

    cuda = dev.type == "cuda"
    cc = torch.cuda.get_device_capability(dev) if cuda else (0, 0)
    out: dict[str, object] = {}
    out["cudnn"] = (lambda q, k, v, p: attn._cudnn(q, k, v)) if cuda else "needs CUDA"
    flash = sdpa_with(SDPBackend.FLASH_ATTENTION)
    out["flash-sdpa"] = (lambda q, k, v, p: flash(q, k, v)) if cuda else "needs CUDA"
    out["sdpa"] = lambda q, k, v, p: attn._sdpa(q, k, v)
    for fp8 in (True, False):
        name = "sage-fp8" if fp8 else "sage-pv16"
        why = None if (cuda or smoke) else "needs CUDA"
        if cuda and cc < ((8, 9) if fp8 else (8, 0)):
            why = f"needs sm{'89' if fp8 else '80'}+"
        out[name] = why or _sage(fp8, prepared=False)
        out[f"{name} K/V prepared"] = why or _sage(fp8, prepared=True)
    for name, module, fn in (("sageattn-pkg", "sageattention", attn._sageattn_pkg), ("flash-attn", "flash_attn",
                                                                                      attn._flash)):  # fmt: skip
        why = attn._module_or_cuda(module)(dev)
        out[name] = why or (lambda q, k, v, p, fn=fn: fn(q, k, v))
    return out


def _sage(fp8: bool, prepared: bool):
    from wanpack.runtime.ops import sage_attention as sa

    def run(q, k, v, store):
        if not prepared:
            return sa.sage_attention(q, k, v, pv_fp8=fp8)
        if "kv" not in store:
            store["kv"] = sa.prepare_kv(k, v, fp8)
        return sa.sage_attention(q, pv_fp8=fp8, kv=store["kv"])

    return run


def accuracy(out: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor) -> dict[str, float]:
    got = out[:, rows].float()
    cos, rel = attn.attention_error(got, ref)
    per_row = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)
    return {"cosine": cos, "rel_l2": rel, "min_row_cosine": per_row.min().item()}


def measure(name: str, fn, qkv, ref, rows, iters: int, flops: float) -> dict:
    q, k, v = qkv
    store: dict = {}
    t0 = time.perf_counter()
    out = fn(q, k, v, store)
    if q.is_cuda:
        torch.cuda.synchronize()
    row = {"first_call_s": time.perf_counter() - t0, **accuracy(out, ref, rows)}
    del out
    secs = median_seconds(lambda: fn(q, k, v, store), iters)
    row.update(ms=secs * 1e3, tflops=flops / secs / 1e12)
    return row


def prepass_ms(qkv, iters: int) -> dict[str, float]:
    """Milliseconds of the quantizing pre-passes alone: Q (every call) and K/V (once per K/V), per P.V path."""
    from wanpack.runtime.ops import sage_attention as sa

    q, k, v = qkv
    out = {"quantize_q": median_seconds(lambda: sa.quantize_queries(q), iters) * 1e3}
    for fp8 in (True, False):
        out[f"prepare_kv_{'fp8' if fp8 else 'pv16'}"] = median_seconds(lambda f=fp8: sa.prepare_kv(k, v, f), iters) * 1e3
    return out


def run_length(n: int, args, dev, table: dict) -> list[dict]:
    heads, hd = args.heads, args.head_dim
    qkv = attn.realistic_qkv(1, n, n, heads, hd, device=dev, dtype=args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = torch.randperm(n, generator=gen)[: min(n, args.check_rows)].sort().values.to(dev)
    ref = attn.reference_attention(qkv[0][:, rows], qkv[1], qkv[2])
    flops = 4.0 * n * n * heads * hd
    results = []
    for name, fn in table.items():
        row = {"tokens": n, "variant": name}
        if isinstance(fn, str):
            row["skipped"] = fn
        else:
            try:
                row.update(measure(name, fn, qkv, ref, rows, args.iters, flops))
            except Exception as exc:  # one variant's failure must not lose the others
                row["error"] = f"{exc!r}"[:500]
                traceback.print_exc(file=sys.stderr)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
        print(f"# {n} {name}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
              file=sys.stderr)  # fmt: skip
    if not isinstance(table.get("sage-pv16"), str):
        try:
            results.append({"tokens": n, "variant": "pre-pass", "ms_by_part": prepass_ms(qkv, args.iters)})
        except Exception as exc:
            results.append({"tokens": n, "variant": "pre-pass", "error": f"{exc!r}"[:500]})
    return results


def print_table(r: dict) -> None:
    print(f"\nattention, batch 1, {r['heads']} heads x {r['head_dim']}, {r['dtype']}, {r['device']} ({r['date']}, torch {r['torch']}, "
          f"triton {r['triton']}); accuracy vs fp32 on {r['check_rows']} query rows")  # fmt: skip
    print(f"{'variant':24} {'tokens':>6} {'ms':>9} {'TFLOP/s':>8} {'vs cudnn':>8} {'cosine':>9} {'min row':>8} "
          f"{'rel L2':>7} {'1st call s':>10}")  # fmt: skip
    cudnn = {x["tokens"]: x.get("ms") for x in r["results"] if x["variant"] == "cudnn"}
    for x in r["results"]:
        if x["variant"] == "pre-pass":
            parts = x.get("ms_by_part") or {"error": x.get("error")}
            print(f"{'  pre-pass ms':24} {x['tokens']:>6} " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float)
                                                                        else f"{k} {v}" for k, v in parts.items()))  # fmt: skip
            continue
        if "ms" not in x:
            print(f"{x['variant']:24} {x['tokens']:>6} {'-':>9} ({x.get('skipped') or x.get('error')})")
            continue
        base = cudnn.get(x["tokens"])
        speed = f"{base / x['ms']:.2f}x" if base else "-"
        print(f"{x['variant']:24} {x['tokens']:>6} {x['ms']:9.2f} {x['tflops']:8.0f} {speed:>8} {x['cosine']:9.6f} "
              f"{x['min_row_cosine']:8.5f} {x['rel_l2']:7.4f} {x['first_call_s']:10.1f}")  # fmt: skip
    if r.get("tuned_configs"):
        print("autotuned: " + "; ".join(f"{k} -> {v}" for k, v in r["tuned_configs"].items()))
    print(f"wall {r['wall_s']:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32760, 75600])
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--check-rows", type=int, default=2048, help="query rows compared against fp32")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes; measures nothing")
    args = ap.parse_args()
    args.dtype = torch.bfloat16
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (the sage variants import it lazily)
        # fp16: the interpreter multiplies bf16 dot operands as raw bits (tests/interp.py corrects it for the tests)
        args.tokens, args.heads, args.head_dim, args.iters, args.check_rows = [100], 2, 64, 1, 100
        args.dtype = torch.float16
    elif not torch.cuda.is_available():
        print("attn_bench needs a CUDA GPU (or --smoke on CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.smoke else "cuda")
    t_start = time.time()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "triton": triton_version, "date": time.strftime("%F"), "heads": args.heads,
              "head_dim": args.head_dim, "dtype": str(args.dtype).removeprefix("torch."), "check_rows": args.check_rows, "results": []}  # fmt: skip
    table = variants(dev, args.smoke)
    for n in args.tokens:
        result["results"] += run_length(n, args, dev, table)
    try:
        from wanpack.runtime.ops import sage_attention as sa

        result["tuned_configs"] = sa.tuned_configs()
    except ImportError:
        pass
    result["wall_s"] = time.time() - t_start
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
