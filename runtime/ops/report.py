"""Say once per process and device which GEMM and attention backends the runtime picked (on stderr)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from wanpack.runtime.ops.attention import attn_backend
from wanpack.runtime.ops.linear import describe_gemm
from wanpack.runtime.ops.norms import fused_norms

_reported: set[torch.device] = set()


def report_backends(device: torch.device | str, log: Callable[[str], None] | None = None) -> dict[str, str]:
    """{'bf16': 'matmul', 'int8': ..., 'fp8': ..., 'attention': ..., 'norms': ...}; logged once per device."""
    device = torch.device(device)
    info = {**describe_gemm(device), "attention": attn_backend(device).name,
            "norms": "triton" if fused_norms(device) else "torch"}  # fmt: skip
    if device not in _reported:
        _reported.add(device)
        line = (f"wanpack: on {device}: gemm int8={info['int8']} fp8={info['fp8']}, attention={info['attention']}, "
                f"norms={info['norms']}")  # fmt: skip
        (log or (lambda m: print(m, file=sys.stderr)))(line)
    return info
