"""Where a quantized linear's time goes: activation quantization vs the GEMM vs the bf16 baseline, per shape.

    python benchmarks/linear_probe.py
"""

from __future__ import annotations

import torch
from _timing import median_seconds

from wanpack.convert.quantize import quantize_weight
from wanpack.runtime.ops import linear as L


def bench(fn, iters: int = 20) -> float:
    return median_seconds(fn, iters, warmup=3)


def main() -> None:
    dev = torch.device("cuda")
    print(f"{'M':>6} {'K':>6} {'N':>6} {'bf16 ms':>8} {'quant8 ms':>9} {'quantf8 ms':>10} {'int8 gemm':>9} "
          f"{'int_mm':>7} {'fp8 mm':>7} {'lin int8':>8} {'lin fp8':>8}")  # fmt: skip
    for m in (4864, 16384, 32760):
        for k, n in ((5120, 5120), (5120, 13824), (13824, 5120)):
            probe(dev, m, k, n)


def probe(dev: torch.device, m: int, k: int, n: int) -> None:
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k) / k**0.5
    wb = w.to(dev, torch.bfloat16)
    q8, s8 = (t.to(dev) for t in quantize_weight(w, "int8"))
    qf, sf = (t.to(dev) for t in quantize_weight(w, "fp8"))
    bias = torch.zeros(n, device=dev, dtype=torch.bfloat16)
    from wanpack.runtime.ops import triton_kernels as tk

    xq8, xs8 = tk.quantize_rows(x, "int8")
    xqf, xsf = tk.quantize_rows(x, "fp8")
    t = {
        "bf16": bench(lambda: torch.nn.functional.linear(x, wb, bias)),
        "q8": bench(lambda: tk.quantize_rows(x, "int8")),
        "qf": bench(lambda: tk.quantize_rows(x, "fp8")),
        "g8": bench(lambda: tk.int8_gemm(xq8, xs8, q8, s8, bias, torch.bfloat16)),
        "im": bench(lambda: torch._int_mm(xq8, q8.t())),
        "gf": bench(lambda: torch._scaled_mm(xqf, qf.t(), scale_a=xsf, scale_b=sf.reshape(1, -1),
                                             bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)),
        "l8": bench(lambda: L.linear(x, q8, bias, s8)),
    }
    t["lf"] = bench(lambda: L.linear(x, qf, bias, sf))
    print(f"{m:6} {k:6} {n:6} " + " ".join(f"{t[c] * 1e3:8.3f}" for c in ("bf16", "q8", "qf", "g8", "im", "gf",
                                                                           "l8", "lf")))  # fmt: skip


if __name__ == "__main__":
    main()
