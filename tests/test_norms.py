"""The fused LayerNorm+modulation and RMS+RoPE Triton kernels against their torch definitions (TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch
from interp import run_in_triton_interpreter

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
    run_in_triton_interpreter(_SCRIPT)


_QUANT_SCRIPT = r"""
import torch
from wanpack.runtime.ops import triton_kernels as tk
from wanpack.runtime.ops.linear import quantize_activation_torch
gen = torch.Generator().manual_seed(0)
bf = torch.bfloat16
x = torch.randn(2, 21, 96, generator=gen) * 3 + 1
x[:, :, 5] *= 40  # an outlier channel
shift, scale = (0.5 * torch.randn(2, 6, 96, generator=gen)).chunk(6, dim=1)[:2]
shift = shift.clone()
x[1, 9] = 1.0  # a constant row normalizes to zeros; with batch 1's shift at zero its output row is all zero
shift[1] = 0.0
w, b = torch.randn(96, generator=gen), torch.randn(96, generator=gen)
cases = {"modulated, token-strided": (x[:, 4:], dict(shift=shift, scale=scale)),
         "modulated batch-1 mod": (x, dict(shift=shift[:1], scale=scale[:1])),
         "affine": (x, dict(weight=w, bias=b))}
for name, (xin, kw) in cases.items():
    ref = tk.layer_norm(xin, 1e-6, bf, **kw)
    for qd, scheme in ((torch.int8, "int8"), (torch.float8_e4m3fn, "fp8")):
        out, q, s = tk.layer_norm_quant(xin, 1e-6, bf, qd, **kw)
        assert torch.equal(out, ref), name  # the bf16 output is untouched by the fusion
        none, q2, s2 = tk.layer_norm_quant(xin, 1e-6, bf, qd, **kw, write_out=False)
        assert none is None and torch.equal(s2, s) and torch.equal(q2.view(torch.uint8), q.view(torch.uint8)), name
        rq, rs = quantize_activation_torch(ref.reshape(-1, 96), qd)
        assert q.shape == rq.shape and q.dtype == qd and s.shape == rs.shape
        assert torch.equal(s, rs), (name, scheme)  # scales exact for both schemes
        if qd == torch.int8:
            assert torch.equal(q, rq), name
        else:
            # the interpreter's fp32 -> e4m3 cast rounds differently from torch's (GPU exactness: test_dit_gpu), so
            # compare against the standalone Triton quantizer, which goes through the same cast
            tq, ts = tk.quantize_rows(ref.reshape(-1, 96), scheme)
            assert torch.equal(q.view(torch.uint8), tq.view(torch.uint8)) and torch.equal(s, ts), name
    if "strided" in name:
        assert s[(9 - 4) + 17].item() == 0 and q[(9 - 4) + 17].float().abs().max().item() == 0  # zero row: scale 0
print("ok")
"""


def test_fused_layer_norm_quantize_in_interpreter():
    """The LayerNorm kernel's quantizing variant writes exactly quantize_rows(its own bf16 output)."""
    run_in_triton_interpreter(_QUANT_SCRIPT)


def test_layer_norm_quantized_falls_back_on_cpu():
    """Without the kernel the wrapper holds today's layer_norm output and no precomputed copy (quantized lazily)."""
    x, shift, scale = torch.randn(2, 5, 64), torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    act = norms.layer_norm_quantized(x, 1e-6, torch.bfloat16, torch.float32, torch.int8, shift=shift, scale=scale)
    assert torch.equal(act.x, norms.layer_norm(x, 1e-6, torch.bfloat16, torch.float32, shift=shift, scale=scale))
    assert not act._quantized


def test_cpu_uses_torch_definitions():
    x = torch.randn(1, 5, 64)
    assert not norms._fused(x, torch.float32)
    cos, sin = torch.randn(5, 16), torch.randn(5, 16)
    got = norms.rms_norm_rope(x, torch.ones(64), 1e-6, torch.float32, torch.float32, 32, cos, sin)
    assert torch.equal(got, norms.rms_norm_rope_torch(x, torch.ones(64), 1e-6, torch.float32, torch.float32, 32, cos,
                                                      sin))  # fmt: skip
