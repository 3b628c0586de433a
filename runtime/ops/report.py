"""Say once per process and device which GEMM and attention backends the runtime picked (on stderr)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from wanpack.runtime.ops.attention import attn_backend
from wanpack.runtime.ops.linear import describe_gemm

_reported: set[torch.device] = set()


def report_backends(device: torch.device | str, log: Callable[[str], None] | None = None) -> dict[str, str]:
    """{'bf16': 'matmul', 'int8': ..., 'fp8': ..., 'attention': ...}; logged the first time a device is asked about."""
    device = torch.device(device)
    info = {**describe_gemm(device), "attention": attn_backend(device).name}
    if device not in _reported:
        _reported.add(device)
        line = f"wanpack: on {device}: gemm int8={info['int8']} fp8={info['fp8']}, attention={info['attention']}"
        (log or (lambda m: print(m, file=sys.stderr)))(line)
    return info
