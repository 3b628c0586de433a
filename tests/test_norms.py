"""The fused LayerNorm+modulation and RMS+RoPE Triton kernels against their torch definitions (TRITON_INTERPRET=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wanpack.runtime.ops import norms

_SCRIPT = r"""
import torch
from wanpack.runtime.ops import norms, triton_kernels as tk
gen = torch.Generator().manual_seed(0)
f32 = torch.float32
x = torch.randn(2, 21, 96, generator=gen) * 3 + 1
shift, scale = torch.randn(2, 6, 96, generator=gen).chunk(6, dim=1)[:2]  # strided views, like the modulation
w, b = torch.randn(96, generator=gen), torch.randn(96, generator=gen)
cos, sin = torch.randn(21, 8, generator=gen), torch.randn(21, 8, generator=gen)
checks = {
    "modulated": (tk.layer_norm(x[:, 4:], 1e-6, f32, shift, scale),
                  norms.layer_norm_torch(x[:, 4:], 1e-6, f32, f32, shift=shift, scale=scale)),
    "modulated batch-1 mod": (tk.layer_norm(x, 1e-6, f32, shift[:1], scale[:1]),
                              norms.layer_norm_torch(x, 1e-6, f32, f32, shift=shift[:1], scale=scale[:1])),
    "affine": (tk.layer_norm(x, 1e-6, f32, weight=w, bias=b), norms.layer_norm_torch(x, 1e-6, f32, f32, weight=w,
                                                                                      bias=b)),
    "rms+rope": (tk.rms_rope(x[:, 4:], w, cos[4:], sin[4:], 16, 1e-6, f32),
                 norms.rms_norm_rope_torch(x[:, 4:], w, 1e-6, f32, f32, 16, cos[4:], sin[4:])),
    "rms": (tk.rms_rope(x, w, None, None, 16, 1e-6, f32), norms.rms_norm_rope_torch(x, w, 1e-6, f32, f32, 16)),
}
for name, (got, ref) in checks.items():
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-6, (name, err)
bf = tk.rms_rope(x, w, cos, sin, 16, 1e-6, torch.bfloat16)
ref = norms.rms_norm_rope_torch(x, w, 1e-6, torch.bfloat16, f32, 16, cos, sin)
assert (bf.float() - ref.float()).abs().max() <= 2**-7 * ref.float().abs().max()
print("ok")
"""


def test_fused_norm_kernels_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_cpu_uses_torch_definitions():
    x = torch.randn(1, 5, 64)
    assert not norms._fused(x, torch.float32)
    cos, sin = torch.randn(5, 16), torch.randn(5, 16)
    got = norms.rms_norm_rope(x, torch.ones(64), 1e-6, torch.float32, torch.float32, 32, cos, sin)
    assert torch.equal(got, norms.rms_norm_rope_torch(x, torch.ones(64), 1e-6, torch.float32, torch.float32, 32, cos,
                                                      sin))  # fmt: skip
