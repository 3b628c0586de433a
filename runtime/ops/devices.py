"""Device keys for per-device caches (backend choices, self-checks)."""

from __future__ import annotations

import torch


def concrete_device(device: torch.device | str) -> torch.device:
    """``device`` with a CUDA index filled in (``cuda`` -> ``cuda:<current>``), so 'cuda' and 'cuda:0' share a key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
