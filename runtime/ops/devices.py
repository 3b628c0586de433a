"""Device keys for per-device caches (backend choices, self-checks), and waiting for a device without spinning."""

from __future__ import annotations

import torch


def concrete_device(device: torch.device | str) -> torch.device:
    """``device`` with a CUDA index filled in (``cuda`` -> ``cuda:<current>``), so 'cuda' and 'cuda:0' share a key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def wait_for_gpu(device: torch.device | str | None = None) -> None:
    """Wait for the work queued so far on the current stream, asleep on a blocking event rather than spinning in a
    synchronize (a no-op without CUDA work to wait for)."""
    if device is not None and torch.device(device).type != "cuda":
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        done = torch.cuda.Event(blocking=True)
        done.record()
        done.synchronize()
