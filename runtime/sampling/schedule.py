"""Noise levels (sigmas) and the timesteps the DiT sees, for every sampler wanpack offers.

Flow matching: x_t = (1 - s) * x0 + s * eps, the model predicts v = eps - x0. A schedule is N decreasing sigmas in
(0, 1] plus a final 0. Sigmas are computed in float64 with numpy's linspace arithmetic (``start + i * step``) and
then stored as float32 values, the way the reference implementation does, so integer timesteps truncate the same way.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000


def _f32(x: float) -> float:
    """Round a Python float to the nearest float32 value (and back to a Python float)."""
    return struct.unpack("f", struct.pack("f", x))[0]


# The reference UniPC/DPM scheduler takes sigma_max from a float32 table built as 1 - 0.001, so it is 0.999 in float32.
UNIPC_SIGMA_MAX = _f32(0.999)


def linspace(start: float, stop: float, num: int) -> list[float]:
    """numpy.linspace(start, stop, num) in float64, element for element (endpoint included)."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    values = [i * step + start for i in range(num)]
    values[-1] = stop
    return values


def shift_sigmas(sigmas: Sequence[float], shift: float) -> list[float]:
    """s' = shift * s / (1 + (shift - 1) * s): spends more steps at high noise when shift > 1."""
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in sigmas]


def unipc_sigmas(steps: int, shift: float) -> list[float]:
    """Shifted linspace(0.999, 0, N+1)[:-1] (float64), the base models' UniPC schedule without the final 0."""
    return shift_sigmas(linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1)[:-1], shift)


def dpmpp_sigmas(steps: int, shift: float) -> list[float]:
    """Shifted linspace(1, 0, N+1)[:N] (float64): the reference DPM++ and plain Euler schedule."""
    return shift_sigmas(linspace(1.0, 0.0, steps + 1)[:steps], shift)


def distill_sigmas(step_list: Sequence[int], shift: float) -> list[float]:
    """A distilled model's fixed timesteps as sigmas, t/1000 shifted: [1000, 750, 500, 250] at 5 -> 1 ... 0.625."""
    return shift_sigmas([t / NUM_TRAIN_TIMESTEPS for t in step_list], shift)


def with_final_zero(sigmas: Sequence[float]) -> list[float]:
    """float32-rounded sigmas plus the terminal 0 every sampler steps to last."""
    return [_f32(s) for s in sigmas] + [0.0]


def int_timesteps(sigmas: Sequence[float]) -> torch.Tensor:
    """int64(s * 1000) from the float64 sigmas (truncation, as the reference does): UniPC and DPM++ feed these."""
    return torch.tensor([int(s * NUM_TRAIN_TIMESTEPS) for s in sigmas], dtype=torch.int64)


def float_timesteps(sigmas32: Sequence[float]) -> torch.Tensor:
    """float32 s * 1000 from the float32 sigmas: Euler and the distilled schedule feed these."""
    return torch.tensor(sigmas32, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS
