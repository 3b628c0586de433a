"""The FFN's tanh-approximated GELU, fused with the per-token quantizer of ffn.2's input on CUDA.

Unfused, a W8A8 FFN reads its [L, ffn_dim] hidden activation three times and writes it twice (GELU in, GELU out,
quantizer in); ffn_dim is 2.7x the model width, so at 480p on a 14B block that is ~2.3 GB of traffic per step. The
Triton kernel reads it once and writes only the int8/fp8 copy and its per-token scales (plus the 16-bit GELU output
when some consumer still needs it).

Exactness: the kernel computes torch's CUDA formula in fp32 with the CUDA math library's tanhf, rounds to the
activation dtype and quantizes that rounded value with the shared quantizer, so (q, scale) always equal
quantize_activation of the kernel's own GELU output. That output must match F.gelu within :func:`gelu_close`'s
tolerance (a different tanhf build can round differently, and in the far negative tail 1 + tanh cancels in fp32, so
both are only accurate to ~1e-7 absolute there); the self-check on first use enforces this and keeps the unfused
path otherwise, and records whether the match was bit for bit.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from wanpack.runtime.ops import norms
from wanpack.runtime.ops.linear import QuantizedActivation, quantize_activation

_fused_ok: dict[torch.device, bool] = {}
_exact: dict[torch.device, bool] = {}


def gelu_tanh_quantized(h: torch.Tensor, qdtype: torch.dtype | None, keep_plain: bool = True) -> QuantizedActivation:
    """GELU(h, tanh) wrapped for the next linear. h [..., N] in bf16/fp16 (fp32 takes the torch path).

    With ``qdtype`` on CUDA the fused kernel also writes the per-token quantized copy, and with ``keep_plain=False``
    only that copy. Otherwise: F.gelu, quantized lazily by the first W8A8 linear as for any tensor.
    """
    if qdtype is not None and h.dtype in (torch.bfloat16, torch.float16) and fused_gelu_quant(h.device):
        from wanpack.runtime.ops import triton_kernels

        out, q, qs = triton_kernels.gelu_tanh_quant(h, qdtype, write_out=keep_plain)
        return QuantizedActivation(out, {qdtype: (q, qs)}, shape=h.shape, dtype=h.dtype)
    return QuantizedActivation(F.gelu(h, approximate="tanh"))


def fused_gelu_quant(device: torch.device | str) -> bool:
    """Whether the fused GELU+quantize kernel serves ``device`` (CUDA, triton, self-check passed; checked once)."""
    device = torch.device(device)
    if not norms.fused_norms(device):  # CUDA, triton importable and the basic kernels work
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _fused_ok:
        _fused_ok[device] = _self_check(device)
    return _fused_ok[device]


def gelu_matches_torch_exactly(device: torch.device | str) -> bool | None:
    """What the self-check saw: True if the kernel's GELU equalled F.gelu bit for bit, None if it never ran."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _exact.get(device)


def gelu_close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Each element within one 16-bit ulp of ref, or within 2^-16 of its row's largest |ref| (far below an int8 step,
    amax/127, and the e4m3 steps that matter; it only admits the fp32-cancellation noise of the negative tail)."""
    floor = 2.0**-16 * ref.float().abs().amax(dim=-1, keepdim=True)
    near = (out.float() - ref.float()).abs() <= floor
    return bool((near | (ulp_distance(out, ref) <= 1)).all())


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two same-dtype 16-bit float tensors of one sign each
    (compares the bit patterns as sign-magnitude integers)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def _self_check(device: torch.device) -> bool:
    """Kernel vs F.gelu + quantize_activation on values spanning GELU's regimes (tails, the bend, zero rows)."""
    try:
        from wanpack.runtime.ops import triton_kernels

        gen = torch.Generator(device=device).manual_seed(5)
        h = (4 * torch.randn(48, 1000, device=device, generator=gen)).to(torch.bfloat16)
        h[3] = 0
        h[7] = -20.0  # GELU of a large negative is -0.0: a zero row after rounding
        ref = F.gelu(h, approximate="tanh")
        ok, exact = True, True
        for qdtype in (torch.int8, torch.float8_e4m3fn):
            out, q, qs = triton_kernels.gelu_tanh_quant(h, qdtype)
            rq, rs = quantize_activation(out, qdtype)
            ok &= torch.equal(qs, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
            ok &= gelu_close(out, ref)
            exact &= torch.equal(out, ref)
            _, q2, qs2 = triton_kernels.gelu_tanh_quant(h, qdtype, write_out=False)
            ok &= torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(qs2, qs)
        _exact[device] = exact
        if not ok:
            print("wanpack: fused GELU+quantize kernel failed its self-check; quantizing separately", file=sys.stderr)
        return ok
    except Exception as exc:
        print(f"wanpack: fused GELU+quantize kernel failed its self-check ({exc!r}); quantizing separately",
              file=sys.stderr)  # fmt: skip
        return False
