"""Say once per process and device which GEMM and attention backends the runtime picked (on stderr)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from wanpack.runtime.ops.attention import attention_ran, attn_backend
from wanpack.runtime.ops.linear import describe_gemm
from wanpack.runtime.ops.norms import fused_norms

_reported: set[torch.device] = set()


def backend_info(device: torch.device | str) -> dict[str, str]:
    """{'bf16': 'matmul', 'int8': ..., 'fp8': ..., 'attention': ..., 'attention_ran': ..., 'norms': ...}.

    'attention' is the backend chosen for 16-bit inputs; 'attention_ran' lists (comma-separated) those that served
    calls so far, which adds 'sdpa' for fp32 inputs and the best exact backend for shapes the chosen one does not take
    ('-' before any call).
    """
    device = torch.device(device)
    return {**describe_gemm(device), "attention": attn_backend(device).name,
            "attention_ran": ",".join(attention_ran(device)) or "-",
            "norms": "triton" if fused_norms(device) else "torch"}  # fmt: skip


def report_backends(device: torch.device | str, log: Callable[[str], None] | None = None) -> dict[str, str]:
    """:func:`backend_info`, logged once per device."""
    device = torch.device(device)
    info = backend_info(device)
    if device not in _reported:
        _reported.add(device)
        line = (f"wanpack: on {device}: gemm int8={info['int8']} fp8={info['fp8']}, attention={info['attention']}, "
                f"norms={info['norms']}")  # fmt: skip
        (log or (lambda m: print(m, file=sys.stderr)))(line)
    return info
