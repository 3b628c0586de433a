"""The DiT's per-token normalizations, fused on CUDA when triton is present.

- ``layer_norm``: LayerNorm without affine followed by the block modulation ``* (1 + scale) + shift``, or the affine
  norm3; computed in fp32 from the fp32 residual, written in the compute dtype.
- ``rms_norm_rope``: the Q/K RMS norm over the full width (across heads), its gain, then the interleaved-pair RoPE
  rotation, written in the compute dtype.

``layer_norm_quantized`` is ``layer_norm`` for an input that feeds W8A8 linears: on CUDA the same kernel also writes the
per-token int8/fp8 copy and its scale (what the GEMM backend would otherwise compute in a separate pass that reads the
output back), handed on as a QuantizedActivation.

In eager torch each is a chain of fp32 temporaries (about 100 bytes of traffic per element for RMS + RoPE, ~11 ms
per 14B block at 480p on an H100); the Triton kernels read the input once and write the output once. The torch
versions define the numbers: the kernels must match them (checked once per device; on a mismatch torch is used). The
quantizing variant's codes must equal quantize_activation of its own output bit for bit, and that output must stay
within close_16bit of the plain kernel's (checked once per width; else the unfused path).
"""

from __future__ import annotations

import importlib.util
import sys

import torch
import torch.nn.functional as F

from wanpack.runtime.ops.devices import concrete_device
from wanpack.runtime.ops.linear import QuantizedActivation, quantize_activation

_fused_ok: dict[torch.device, bool] = {}
_fused_quant_ok: dict[tuple[torch.device, int], bool] = {}


def fused_norms(device: torch.device | str) -> bool:
    """Whether the Triton kernels serve fp32-hi norms on ``device`` (CUDA, triton importable, self-check passed)."""
    device = torch.device(device)
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    device = concrete_device(device)
    if device not in _fused_ok:
        _fused_ok[device] = _self_check(device)
    return _fused_ok[device]


def _fused(x: torch.Tensor, hi: torch.dtype) -> bool:
    return hi == torch.float32 and x.is_cuda and fused_norms(x.device)


def layer_norm(x: torch.Tensor, eps: float, out_dtype: torch.dtype, hi: torch.dtype, *,
               shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """x [B, L, C] -> LN(x) * (1 + scale) + shift (shift/scale [B|1, 1, C]) or LN(x) * weight + bias, in out_dtype."""
    if _fused(x, hi):
        from wanpack.runtime.ops import triton_kernels

        return triton_kernels.layer_norm(x, eps, out_dtype, shift, scale, weight, bias)
    return layer_norm_torch(x, eps, out_dtype, hi, shift=shift, scale=scale, weight=weight, bias=bias)


def layer_norm_quantized(x: torch.Tensor, eps: float, out_dtype: torch.dtype, hi: torch.dtype,
                         qdtype: torch.dtype | None, *, shift: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, keep_plain: bool = True) -> QuantizedActivation:  # fmt: skip
    """:func:`layer_norm` wrapped for linears; with ``qdtype`` (int8 | float8_e4m3fn) the fused kernel also writes the
    per-token quantized copy (equal to quantize_activation of the output), and with ``keep_plain=False`` only that
    copy (for consumers that read nothing else). Without the kernel the copy is made lazily by the first W8A8
    linear, exactly as for a plain tensor. x [B, L, C] -> wraps [B, L, C] in out_dtype."""
    if qdtype is not None and out_dtype in (torch.bfloat16, torch.float16) and _fused(x, hi) \
            and fused_norm_quant(x.device, x.shape[-1]):  # fmt: skip
        from wanpack.runtime.ops import triton_kernels

        out, q, qs = triton_kernels.layer_norm_quant(x, eps, out_dtype, qdtype, shift, scale, weight, bias,
                                                     write_out=keep_plain)  # fmt: skip
        return QuantizedActivation(out, {qdtype: (q, qs)}, shape=x.shape, dtype=out_dtype)
    return QuantizedActivation(layer_norm(x, eps, out_dtype, hi, shift=shift, scale=scale, weight=weight, bias=bias))


def fused_norm_quant(device: torch.device | str, width: int) -> bool:
    """Whether the LayerNorm kernel's quantizing variant passes its self-check on ``device`` for rows of ``width``
    (checked once per width: each width compiles to its own kernel, and only the real one proves anything)."""
    device = torch.device(device)
    if not fused_norms(device):
        return False
    device = concrete_device(device)
    if (device, width) not in _fused_quant_ok:
        _fused_quant_ok[(device, width)] = _self_check_quant(device, width)
    return _fused_quant_ok[(device, width)]


def layer_norm_torch(x, eps, out_dtype, hi, *, shift=None, scale=None, weight=None, bias=None) -> torch.Tensor:
    w = None if weight is None else weight.to(hi)
    b = None if bias is None else bias.to(hi)
    y = F.layer_norm(x.to(hi), x.shape[-1:], w, b, eps=eps)
    if shift is not None:
        y = torch.addcmul(shift.to(hi), y, 1 + scale.to(hi))
    return y.to(out_dtype)


def rms_norm_rope(y: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype, hi: torch.dtype,
                  head_dim: int, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y [B, L, C] -> y * rsqrt(mean(y^2) + eps) * weight, rotated by cos/sin [L, head_dim/2] when given; out_dtype."""
    if _fused(y, hi):
        from wanpack.runtime.ops import triton_kernels

        return triton_kernels.rms_rope(y, weight, cos, sin, head_dim, eps, out_dtype)
    return rms_norm_rope_torch(y, weight, eps, out_dtype, hi, head_dim, cos, sin)


def rms_norm_rope_torch(y, weight, eps, out_dtype, hi, head_dim, cos=None, sin=None) -> torch.Tensor:
    x = y.to(hi)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(hi)
    if cos is not None:
        x = apply_rope(x.unflatten(-1, (-1, head_dim)), cos.to(hi), sin.to(hi)).flatten(-2)
    return x.to(out_dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: x [B, L, H, D], cos/sin [L, D/2] -> new tensor [B, L, H, D] in cos's dtype."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)


def _self_check(device: torch.device) -> bool:
    """Fused kernels against the torch versions on a small problem (batch 2, odd length, both variants)."""
    try:
        from wanpack.runtime.ops import triton_kernels

        gen = torch.Generator(device=device).manual_seed(0)
        f32 = torch.float32

        def rnd(*shape):
            return torch.randn(*shape, device=device, generator=gen)

        x, shift, scale, w, b = rnd(2, 37, 320), rnd(2, 1, 320), rnd(1, 1, 320), rnd(320), rnd(320)
        cos, sin = rnd(37, 16), rnd(37, 16)
        pairs = [
            (triton_kernels.layer_norm(x[:, 3:], 1e-6, f32, shift, scale),
             layer_norm_torch(x[:, 3:], 1e-6, f32, f32, shift=shift, scale=scale)),
            (triton_kernels.layer_norm(x, 1e-6, f32, weight=w, bias=b),
             layer_norm_torch(x, 1e-6, f32, f32, weight=w, bias=b)),
            (triton_kernels.rms_rope(x, w, cos, sin, 32, 1e-6, f32), rms_norm_rope_torch(x, w, 1e-6, f32, f32, 32,
                                                                                         cos, sin)),
            (triton_kernels.rms_rope(x, w, None, None, 32, 1e-6, f32), rms_norm_rope_torch(x, w, 1e-6, f32, f32, 32)),
        ]  # fmt: skip
        worst = max(((a - r).abs().max() / r.abs().max()).item() for a, r in pairs)
        if worst > 1e-5:
            print(f"wanpack: fused norm kernels failed their self-check (rel err {worst:.3g})", file=sys.stderr)
        return worst <= 1e-5
    except Exception as exc:
        print(f"wanpack: fused norm kernels failed their self-check ({exc!r}); using torch ops", file=sys.stderr)
        return False


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two same-dtype 16-bit float tensors (bit patterns
    compared as sign-magnitude integers; +0 and -0 are 0 apart)."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def close_16bit(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Each element within one 16-bit ulp of ref, or within 2^-16 of its row's largest |ref|.

    The second clause admits what a different summation order does to a LayerNorm: the mean moves by an fp32 ulp,
    which shifts outputs near zero by many of their own (tiny) ulps but by far less than an int8 step (amax/127).
    """
    floor = 2.0**-16 * ref.float().abs().amax(dim=-1, keepdim=True)
    near = (out.float() - ref.float()).abs() <= floor
    return bool((near | (ulp_distance(out, ref) <= 1)).all())


def _self_check_quant(device: torch.device, width: int) -> bool:
    """The quantizing LayerNorm at ``width``: its q and scales exactly quantize_activation of its own output (with
    and without storing that output), and the output itself close to the plain LayerNorm kernel's (close_16bit:
    the compiler lays the two variants out differently, so their fp32 sums may round differently).

    Cases: modulated on a token-strided view with a row that normalizes to all zeros (scale 0), and the affine norm.
    """
    try:
        from wanpack.runtime.ops import triton_kernels

        gen = torch.Generator(device=device).manual_seed(1)
        x = 3 * torch.randn(2, 37, width, device=device, generator=gen)
        x[..., width // 3] *= 30  # an outlier channel
        shift, scale = (0.5 * torch.randn(2, 6, width, device=device, generator=gen)).chunk(6, dim=1)[:2]
        w = torch.randn(width, device=device, generator=gen)
        b = torch.randn(width, device=device, generator=gen)
        x[1, 9] = 1.0  # a constant row normalizes to zeros; with no shift it stays zero
        shift[1] = 0.0
        cases = [dict(shift=shift, scale=scale), dict(weight=w, bias=b)]
        ok = True
        for qdtype in (torch.int8, torch.float8_e4m3fn):
            for kw in cases:
                out, q, qs = triton_kernels.layer_norm_quant(x[:, 3:], 1e-6, torch.bfloat16, qdtype, **kw)
                rq, rs = quantize_activation(out.reshape(-1, width), qdtype)
                ok &= torch.equal(qs, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
                none, q2, qs2 = triton_kernels.layer_norm_quant(x[:, 3:], 1e-6, torch.bfloat16, qdtype, **kw,
                                                                write_out=False)  # fmt: skip
                ok &= none is None and torch.equal(qs2, rs) and torch.equal(q2.view(torch.uint8), rq.view(torch.uint8))
                ok &= close_16bit(out, triton_kernels.layer_norm(x[:, 3:], 1e-6, torch.bfloat16, **kw))
        if not ok:
            print(f"wanpack: fused norm+quantize kernel failed its self-check at width {width}; quantizing "
                  "separately", file=sys.stderr)  # fmt: skip
        return ok
    except Exception as exc:
        print(f"wanpack: fused norm+quantize kernel failed its self-check ({exc!r}); quantizing separately",
              file=sys.stderr)  # fmt: skip
        return False
