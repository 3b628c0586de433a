"""Offline weight quantization: per-output-channel symmetric int8 / fp8-e4m3, the math the runtime mirrors.

int8:  scale = absmax(row) / 127, q = clamp(round_half_even(w / scale), -128, 127)
fp8:   scale = absmax(row) / 448, q = saturate_to_e4m3fn(w / scale)
Scales are float32 of shape [out, 1], stored next to the weight as ``<key>_scale`` (the LightX2V convention).
A row of zeros gets scale 0 and q 0, so dequantization (q * scale) gives the zeros back and nothing divides by zero.
"""

from __future__ import annotations

import torch

from wanpack.errors import UsageError

QMAX = {"int8": 127.0, "fp8": 448.0}
WEIGHT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_ROWS_PER_CHUNK = 2048  # bounds the float32 temporaries to ~2048 x in_features


def check_scheme(scheme: str) -> str:
    if scheme not in ("int8", "fp8", "none"):
        raise UsageError(f"unknown quant scheme {scheme!r} - choose int8, fp8 or none")
    return scheme


def quantize_weight(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D [out, in] weight per output row; returns (q [out, in], scale float32 [out, 1])."""
    if weight.dim() != 2:
        raise ValueError(f"per-channel quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    qmax = QMAX[scheme]
    out_rows = weight.shape[0]
    q = torch.empty(weight.shape, dtype=WEIGHT_DTYPES[scheme])
    scale = torch.empty((out_rows, 1), dtype=torch.float32)
    for start in range(0, out_rows, _ROWS_PER_CHUNK):
        rows = weight[start : start + _ROWS_PER_CHUNK].to(torch.float32, copy=True)  # never modify the input
        absmax = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True)
        s = absmax / qmax
        scale[start : start + rows.shape[0]] = s
        scaled = rows.div_(torch.where(s > 0, s, torch.ones_like(s)))
        if scheme == "int8":
            q[start : start + rows.shape[0]] = scaled.round_().clamp_(-128.0, 127.0).to(torch.int8)
        else:
            q[start : start + rows.shape[0]] = scaled.clamp_(-qmax, qmax).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale in float32, then cast; the exact inverse the runtime's reference path uses."""
    return (q.float() * scale.float()).to(dtype)


def max_quant_error(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per-row bound on |w - dequant(quant(w))|: half a step for int8, half an e4m3 ulp at the top binade for fp8."""
    absmax = torch.linalg.vector_norm(weight.float(), ord=float("inf"), dim=1, keepdim=True)
    if scheme == "int8":
        return absmax / QMAX["int8"] / 2
    # e4m3 has 3 mantissa bits: relative spacing 2^-3 at the top of each binade, so half-ulp <= |x| * 2^-4;
    # near zero the subnormal step 2^-9 (in units of scale) dominates.
    return absmax * (2.0**-4) + absmax / QMAX["fp8"] * 2.0**-10
