"""Offline weight quantization: per-output-channel symmetric int8 / fp8-e4m3, the math the runtime mirrors.

int8:  scale = absmax(row) / 127, q = clamp(round_half_even(w / scale), -128, 127)
fp8:   scale = absmax(row) / 448, q = saturate_to_e4m3fn(w / scale)
Scales are float32 of shape [out, 1], stored next to the weight as ``<key>_scale`` (the LightX2V convention).
A row of zeros gets scale 0 and q 0, so dequantization (q * scale) gives the zeros back and nothing divides by zero.
"""

from __future__ import annotations

import threading

import torch

from wanpack.errors import UsageError

QMAX = {"int8": 127.0, "fp8": 448.0}
WEIGHT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_CHUNK_BYTES = 8 << 20  # float32 working set per chunk
_work = threading.local()  # one reused chunk buffer per thread: a fresh 8 MB each call page-faults every time


def check_scheme(scheme: str) -> str:
    if scheme not in ("int8", "fp8", "none"):
        raise UsageError(f"unknown quant scheme {scheme!r} - choose int8, fp8 or none")
    return scheme


def quantize_weight(weight: torch.Tensor, scheme: str,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Quantize a 2-D [out, in] weight per output row; returns (q [out, in], scale float32 [out, 1]).

    Works through row chunks of about _CHUNK_BYTES with one reused float32 buffer, so the several elementwise passes
    run mostly in cache instead of streaming the whole matrix through memory once per pass. ``out`` (uint8, at least
    out*in bytes) receives q, so a caller converting many weights can reuse one buffer instead of page-faulting a
    fresh one for each.
    """
    if weight.dim() != 2:
        raise ValueError(f"per-channel quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    qmax = QMAX[scheme]
    out_rows, in_features = weight.shape
    if out is None:
        q = torch.empty(weight.shape, dtype=WEIGHT_DTYPES[scheme])
    else:
        q = out.reshape(-1)[: weight.numel()].view(WEIGHT_DTYPES[scheme]).view(weight.shape)
    scale = torch.empty((out_rows, 1), dtype=torch.float32)
    step = max(1, _CHUNK_BYTES // max(1, 4 * in_features))
    rows_per_chunk = min(step, out_rows)
    buf = getattr(_work, "buf", None)
    if buf is None or buf.numel() < rows_per_chunk * in_features:
        buf = _work.buf = torch.empty(max(rows_per_chunk * in_features, _CHUNK_BYTES // 4), dtype=torch.float32)
    buf = buf[: rows_per_chunk * in_features].view(rows_per_chunk, in_features)
    for start in range(0, out_rows, step):
        rows = weight[start : start + step]
        n = rows.shape[0]
        work = buf[:n]
        work.copy_(rows)  # float32 copy: the input is never modified
        low, high = torch.aminmax(work, dim=1, keepdim=True)
        s = torch.maximum(high, -low).div_(qmax)
        scale[start : start + n] = s
        work.div_(torch.where(s > 0, s, torch.ones_like(s)))
        if scheme == "int8":
            q[start : start + n] = work.round_().clamp_(-128.0, 127.0)
        else:
            q[start : start + n] = work.clamp_(-qmax, qmax)
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
