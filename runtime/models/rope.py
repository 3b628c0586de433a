"""3-D rotary position tables for Wan's self-attention: frame, row and column angles side by side in each head.

A head of d channels holds d/2 complex pairs (2i, 2i+1), interleaved. They split into t = d - 4*(d//6) channels
for the frame index and h = w = 2*(d//6) each for the row and column (44/42/42 for d = 128). Each axis uses the
standard 1/10000^(2j/dim) frequencies over its own width. Tables are built in float64, as the original does;
``wanpack.runtime.ops.norms`` applies them (fused with the Q/K RMS norm on CUDA).
"""

from __future__ import annotations

import torch


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real channels per axis (t, h, w) for a head of ``head_dim`` channels."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(n: int, dim: int, theta: float) -> torch.Tensor:
    """[n, dim/2] float64 angles pos * theta^(-2j/dim)."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(n, dtype=torch.float64), freqs)


def rope_tables(grid: tuple[int, int, int], head_dim: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu",
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(cos, sin), each [F*H*W, head_dim/2], for tokens in (f, h, w) row-major order on the patch grid."""
    f, h, w = grid
    dt, dh, dw = axis_dims(head_dim)
    ang = torch.cat([
        _axis_angles(f, dt, theta)[:, None, None, :].expand(f, h, w, dt // 2),
        _axis_angles(h, dh, theta)[None, :, None, :].expand(f, h, w, dh // 2),
        _axis_angles(w, dw, theta)[None, None, :, :].expand(f, h, w, dw // 2),
    ], dim=-1).reshape(f * h * w, head_dim // 2)  # fmt: skip
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)

