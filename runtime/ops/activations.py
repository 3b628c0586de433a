"""The DiT's FFN activation (GELU, tanh form) as the input of a W8A8 linear.

``gelu_quantized`` hands ffn.2 its input as a QuantizedActivation. On CUDA with triton one kernel reads ffn.0's
output once and writes only the per-token int8/fp8 copy (and the GELU itself only when some consumer reads it);
elsewhere it is torch's GELU, quantized later by the linear as any tensor is. The torch GELU defines the numbers:
the kernel's output must stay within close_16bit of it, and its codes must equal quantize_activation of that
output bit for bit (checked once per device and width, else the unfused path).
"""

from __future__ import annotations

import importlib.util
import sys

import torch
import torch.nn.functional as F

from wanpack.runtime.ops.devices import concrete_device
from wanpack.runtime.ops.linear import QuantizedActivation, quantize_activation
from wanpack.runtime.ops.norms import close_16bit

_fused_ok: dict[tuple[torch.device, int], bool] = {}


def gelu(h: torch.Tensor) -> torch.Tensor:
    """The reference: torch's GELU in its tanh form (Wan's FFN), in h's dtype."""
    return F.gelu(h, approximate="tanh")


def gelu_quantized(h: torch.Tensor, qdtype: torch.dtype | None, keep_plain: bool = True) -> QuantizedActivation:
    """GELU(h) wrapped for linears; with ``qdtype`` the fused kernel also writes the per-token quantized copy, and
    with ``keep_plain=False`` only that copy. h [..., K] in bf16/fp16 -> wraps [..., K] in h's dtype."""
    if qdtype is not None and h.dtype in (torch.bfloat16, torch.float16) and fused_gelu_quant(h.device, h.shape[-1]):
        from wanpack.runtime.ops import triton_kernels

        g, q, qs = triton_kernels.gelu_quant(h.reshape(-1, h.shape[-1]), qdtype, write_out=keep_plain)
        return QuantizedActivation(None if g is None else g.view(h.shape), {qdtype: (q, qs)}, shape=h.shape,
                                   dtype=h.dtype)  # fmt: skip
    return QuantizedActivation(gelu(h))


def fused_gelu_quant(device: torch.device | str, width: int) -> bool:
    """Whether the GELU+quantize kernel passed its self-check on ``device`` for rows of ``width``."""
    device = torch.device(device)
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    device = concrete_device(device)
    if (device, width) not in _fused_ok:
        _fused_ok[(device, width)] = _self_check(device, width)
    return _fused_ok[(device, width)]


def _self_check(device: torch.device, width: int) -> bool:
    """The kernel at ``width`` on values across GELU's range (large negative ones included, where 1 + tanh cancels
    in the textbook form), a zero row (scale 0), both quantized dtypes, with and without storing the GELU."""
    try:
        from wanpack.runtime.ops import triton_kernels

        gen = torch.Generator(device=device).manual_seed(2)
        h = (4 * torch.randn(37, width, device=device, generator=gen)).to(torch.bfloat16)
        h[:, width // 3] *= 8  # an outlier channel
        h[5] = 0
        ok = True
        for qdtype in (torch.int8, torch.float8_e4m3fn):
            g, q, qs = triton_kernels.gelu_quant(h, qdtype)
            rq, rs = quantize_activation(g, qdtype)
            ok &= close_16bit(g, gelu(h))
            ok &= torch.equal(qs, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
            none, q2, qs2 = triton_kernels.gelu_quant(h, qdtype, write_out=False)
            ok &= none is None and torch.equal(qs2, rs) and torch.equal(q2.view(torch.uint8), rq.view(torch.uint8))
        if not ok:
            print(f"wanpack: fused GELU+quantize kernel failed its self-check at width {width}; using torch's GELU",
                  file=sys.stderr)  # fmt: skip
        return bool(ok)
    except Exception as exc:
        print(f"wanpack: fused GELU+quantize kernel failed its self-check ({exc!r}); using torch's GELU",
              file=sys.stderr)  # fmt: skip
        return False
