"""Reading named tensors out of a weight dict: the one place that knows the quantized-weight naming.

Models receive plain ``Mapping[str, Tensor]``s (views cut from a streamed buffer, or a resident state dict). A
quantized Linear keeps its name ``X.weight`` (int8 / fp8) and carries ``X.weight_scale`` (float32 [out, 1]); a missing
tensor means the pack and the model disagree, which the user fixes by re-converting, so it is a PackFormatError.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from wanpack.errors import PackFormatError
from wanpack.runtime.ops.linear import Activation, linear, linear_add_

QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)


def need(weights: Mapping[str, torch.Tensor], key: str, part: str) -> torch.Tensor:
    """``weights[key]``, or a one-line error naming the part of the model that wanted it."""
    try:
        return weights[key]
    except KeyError:
        raise PackFormatError(f"{part}: weight {key!r} is missing - re-convert the pack with this component") from None


def block_view(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (e.g. ``blocks.3.``) with the prefix removed: what a block callable receives."""
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def _linear_parts(weights: Mapping[str, torch.Tensor], name: str, part: str,
                  bias: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(weight, bias or None, weight_scale or None) of Linear ``name``, checked."""
    weight = need(weights, f"{name}.weight", part)
    scale = weights.get(f"{name}.weight_scale")
    if scale is None and weight.dtype in QUANT_DTYPES:
        raise PackFormatError(f"{part}: {name}.weight is {weight.dtype} but has no weight_scale - re-convert the pack")
    return weight, need(weights, f"{name}.bias", part) if bias else None, scale


def apply_linear(weights: Mapping[str, torch.Tensor], name: str, x: Activation, part: str,
                 bias: bool = False) -> torch.Tensor:  # fmt: skip
    """Linear ``name`` applied to x [..., in] -> [..., out], dequantizing through the runtime's linear op."""
    weight, b, scale = _linear_parts(weights, name, part, bias)
    return linear(x, weight, b, scale)


def apply_linear_add_(weights: Mapping[str, torch.Tensor], name: str, x: Activation, out: torch.Tensor, part: str,
                      gate: torch.Tensor | None = None, bias: bool = False) -> None:  # fmt: skip
    """out += Linear ``name``(x) (* gate), in place (see :func:`wanpack.runtime.ops.linear.linear_add_`)."""
    weight, b, scale = _linear_parts(weights, name, part, bias)
    linear_add_(out, x, weight, b, scale, gate)
