"""What every sampler looks like to the pipeline, and classifier-free guidance.

The pipeline loop is the same for all of them::

    for i, t in enumerate(sched.timesteps):
        v = model(x, t)                       # or cfg_combine(...) of a [cond, uncond] batch
        x = sched.step(v, i, x)

``step`` returns the latent at the next noise level; after the last step that is the clean latent (sigma 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from wanpack.errors import UsageError


class FlowScheduler:
    """A flow-matching sampler over a fixed list of sigmas (N levels plus a final 0).

    ``sigmas`` has N+1 float32-valued entries ending in 0; ``timesteps`` ([N], int64 or float32) is what the DiT's time
    embedding receives at each step. Multistep samplers keep history, so steps must be taken in order from 0;
    :meth:`reset` starts a new trajectory.
    """

    name = "flow"

    def __init__(self, sigmas: Sequence[float], timesteps: torch.Tensor):
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) < 2 or sigmas[-1] != 0.0 or len(timesteps) != len(sigmas) - 1:
            raise UsageError(f"{self.name} schedule is malformed ({len(sigmas)} sigmas) - this is a wanpack bug")
        decreasing = all(a > b for a, b in zip(sigmas[:-1], sigmas[1:], strict=True))
        if not decreasing or any(not 0.0 < s <= 1.0 for s in sigmas[:-1]):
            raise UsageError(f"{self.name} sigmas must decrease inside (0, 1] - check shift and the step list")
        self.sigmas = sigmas
        self.timesteps = timesteps
        self._next = 0

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def reset(self) -> None:
        """Forget the history of the previous trajectory."""
        self._next = 0

    def step(self, model_output: torch.Tensor, step_index: int, sample: torch.Tensor) -> torch.Tensor:
        """Move ``sample`` from sigmas[i] to sigmas[i+1] given the model's velocity; same shape and dtype as sample."""
        if step_index != self._next:
            raise UsageError(f"{self.name} step {step_index} taken out of order (expected {self._next}) - call reset()")
        if not 0 <= step_index < self.num_steps:
            raise UsageError(f"{self.name} step {step_index} is outside 0..{self.num_steps - 1}")
        out = self._step(model_output.to(torch.float32), step_index, sample.to(torch.float32))
        self._next = step_index + 1
        return out.to(sample.dtype)

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_x0(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Clean-latent estimate x0 = x - s_i * v (flow prediction)."""
        return x - self.sigmas[i] * v


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance, uncond + g * (cond - uncond), in the reference's order of operations."""
    return uncond + guidance * (cond - uncond)


def cfg_combine_batch(output: torch.Tensor, guidance: float) -> torch.Tensor:
    """CFG over one batched forward: output [2, ...] holds (cond, uncond) in that order; returns [1, ...].

    Running both branches as one batch means each streamed block crosses the bus once per step, not twice.
    """
    if output.shape[0] != 2:
        raise UsageError(f"CFG batch must hold (cond, uncond), got batch {output.shape[0]} - this is a wanpack bug")
    return cfg_combine(output[:1], output[1:], guidance)


def log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; +inf at sigma 0, -inf at sigma 1."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)
