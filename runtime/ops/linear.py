"""Linear layers over the weights a pack stores: bf16/fp32, or int8/fp8 with a per-output-channel scale.

This is the reference path (dequantize, then matmul in the activation's dtype); it runs everywhere and defines the
numbers. Faster backends (int8 GEMM, fp8 scaled_mm) plug in behind the same signature.
"""

from __future__ import annotations

import torch


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """y = x @ W^T + b, where W = weight * scale when the weight is quantized.

    Shapes: x [..., in], weight [out, in], scale [out, 1] float32 (quantized weights only), bias [out]. Returns [..., out]
    in x's dtype.
    """
    if scale is not None:
        w = (weight.to(torch.float32) * scale.to(torch.float32)).to(x.dtype)
    else:
        w = weight.to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
