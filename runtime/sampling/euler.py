"""Flow-matching Euler: plain (shifted linspace) and the 4-step distilled schedule (lightx2v step/CFG distillation).

Each step predicts x0 = x - s_i * v and moves to the next level along the same velocity, x <- x0 + s_{i+1} * v;
the last step (s_{N} = 0) returns x0. Timesteps are fed to the model as float s * 1000.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wanpack.errors import UsageError
from wanpack.manifests.run_config import DISTILL_STEP_LIST
from wanpack.runtime.sampling.base import FlowScheduler
from wanpack.runtime.sampling.schedule import (
    NUM_TRAIN_TIMESTEPS,
    distill_sigmas,
    dpmpp_sigmas,
    float_timesteps,
    with_final_zero,
)


class _EulerBase(FlowScheduler):
    """Deterministic Euler over float64 sigmas (N levels; stored as float32 with the final 0 appended)."""

    def __init__(self, base_sigmas: Sequence[float]):
        sigmas = with_final_zero(base_sigmas)
        super().__init__(sigmas, float_timesteps(sigmas[:-1]))

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        x0 = self.predict_x0(v, i, x)
        if i == self.num_steps - 1:
            return x0
        return x0 + self.sigmas[i + 1] * v


class FlowEulerScheduler(_EulerBase):
    """Plain Euler over shifted linspace(1, 0, N+1)[:N]."""

    name = "euler"

    def __init__(self, steps: int, shift: float):
        super().__init__(dpmpp_sigmas(steps, shift))


class DistillEulerScheduler(_EulerBase):
    """The distilled models' fixed schedule: sigmas of ``step_list`` shifted; run without CFG."""

    name = "distill"

    def __init__(self, step_list: Sequence[int] = DISTILL_STEP_LIST, shift: float = 5.0):
        steps = [int(t) for t in step_list]
        if not steps or any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in steps):
            raise UsageError(f"denoising_step_list {steps} must hold timesteps in 1..1000 - e.g. [1000, 750, 500, 250]")
        super().__init__(distill_sigmas(steps, shift))
