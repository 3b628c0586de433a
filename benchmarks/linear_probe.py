"""Where a quantized linear's time goes: activation quantization vs the GEMM vs the bf16 baseline, per shape.

    python benchmarks/linear_probe.py

Times in ms; the last four columns are TOP/s of the GEMMs alone: our int8 GEMM as it runs (tiles by TMA on sm90+)
and with plain loads (the pre-TMA kernel, as sm80-sm89 run it), torch._int_mm, and fp8 torch._scaled_mm.
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
    print(f"{'M':>6} {'K':>6} {'N':>6} {'bf16':>8} {'quant8':>8} {'quantf8':>8} {'int8 gemm':>9} {'int8 ptr':>8} "
          f"{'int_mm':>8} {'fp8 mm':>8} {'lin int8':>8} {'lin fp8':>8} | {'T int8':>7} {'T ptr':>7} {'T int_mm':>8} "
          f"{'T fp8':>7}")  # fmt: skip
    for m in (7560, 8190, 32760):
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
        "gp": bench_plain_loads(lambda: tk.int8_gemm(xq8, xs8, q8, s8, bias, torch.bfloat16)),
        "im": bench(lambda: torch._int_mm(xq8, q8.t())),
        "gf": bench(lambda: torch._scaled_mm(xqf, qf.t(), scale_a=xsf, scale_b=sf.reshape(1, -1),
                                             bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True)),
        "l8": bench(lambda: L.linear(x, q8, bias, s8)),
    }
    t["lf"] = bench(lambda: L.linear(x, qf, bias, sf))
    ops = 2 * m * k * n
    print(f"{m:6} {k:6} {n:6} " + " ".join(f"{t[c] * 1e3:8.3f}" for c in ("bf16", "q8", "qf", "g8", "gp", "im", "gf",
                                                                           "l8", "lf"))
          + " | " + " ".join(f"{ops / t[c] / 1e12:7.0f}" for c in ("g8", "gp", "im", "gf")))  # fmt: skip


def bench_plain_loads(fn) -> float:
    """fn timed with the GEMM's TMA path off (the autotuner keys on it, so this path is tuned on its own)."""
    from wanpack.runtime.ops import triton_kernels as tk

    real = tk.uses_tma
    tk.uses_tma = lambda device: False
    try:
        return bench(fn)
    finally:
        tk.uses_tma = real


if __name__ == "__main__":
    main()
