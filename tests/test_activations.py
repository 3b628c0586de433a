"""The fused GELU(tanh) + per-token quantizer kernel (TRITON_INTERPRET=1 on CPU) and its CPU fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wanpack.runtime.ops import activations

_SCRIPT = r"""
import torch
import torch.nn.functional as F
from wanpack.runtime.ops import triton_kernels as tk
from wanpack.runtime.ops.activations import gelu_close
gen = torch.Generator().manual_seed(0)
h = (4 * torch.randn(2, 9, 200, generator=gen)).to(torch.bfloat16)  # 3-D, a ragged width (BLOCK 256)
h[0, 3] = 0.0  # zero row: scale 0, codes 0
h[1, 2] = -30.0  # GELU underflows to -0.0 everywhere: also a zero row
h[1, 5, 7] = 60.0  # outlier
ref = F.gelu(h, approximate="tanh")
for qd in (torch.int8, torch.float8_e4m3fn):
    out, q, s = tk.gelu_tanh_quant(h, qd)
    assert out.shape == h.shape and out.dtype == h.dtype and q.shape == (18, 200) and s.shape == (18, 1)
    # the interpreter has no libdevice: its tanh is exp-based, so the match is only within gelu_close's tolerance
    assert gelu_close(out, ref)
    assert not gelu_close(out * 1.02, ref)  # the tolerance is tight: a 2% error fails it
    tq, ts = tk.quantize_rows(out.reshape(-1, 200), "int8" if qd == torch.int8 else "fp8")
    assert torch.equal(s, ts) and torch.equal(q.view(torch.uint8), tq.view(torch.uint8))  # its own output, exactly
    assert s[3].item() == 0 and s[9 + 2].item() == 0 and q[3].float().abs().max().item() == 0
    none, q2, s2 = tk.gelu_tanh_quant(h, qd, write_out=False)
    assert none is None and torch.equal(s2, s) and torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
print("ok")
"""


def test_gelu_quant_kernel_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_cpu_takes_torch_gelu_and_quantizes_lazily():
    h = torch.randn(3, 7, 64).bfloat16()
    act = activations.gelu_tanh_quantized(h, torch.int8, keep_plain=False)  # keep_plain is moot without the kernel
    assert torch.equal(act.x, F.gelu(h, approximate="tanh")) and not act._quantized
    assert not activations.fused_gelu_quant("cpu") and activations.gelu_matches_torch_exactly("cpu") is None


def test_ulp_distance():
    a = torch.tensor([1.0, -1.0, 0.0, -0.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0078125, -1.0078125, -0.0, 0.0, 2.0], dtype=torch.bfloat16)  # next bf16 after 1 is 1 + 2^-7
    assert activations.ulp_distance(a, b).tolist() == [1, 1, 0, 0, 0]


def test_gelu_close_tolerance():
    ref = torch.tensor([[4.0, -3e-7, 1.0]], dtype=torch.bfloat16)
    assert activations.gelu_close(torch.tensor([[4.0, 0.0, 1.0078125]], dtype=torch.bfloat16), ref)  # tail + 1 ulp
    assert not activations.gelu_close(torch.tensor([[4.0, 0.0, 1.015625]], dtype=torch.bfloat16), ref)  # 2 ulp
    assert not activations.gelu_close(torch.tensor([[4.0, -1e-3, 1.0]], dtype=torch.bfloat16), ref)  # 2^-12 of max
