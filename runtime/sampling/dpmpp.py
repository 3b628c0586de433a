"""Flow-matching DPM-Solver++ 2M (midpoint form): the reference's alternative solver ("dpm++").

Data (x0) prediction, order 2 multistep; the first step is first order (no history) and so is the last (final
sigma 0, where the second-order term would divide by an infinite log-SNR step). Coefficients in float64, tensors in
float32.
"""

from __future__ import annotations

import math

import torch

from wanpack.runtime.sampling.base import FlowScheduler, log_snr
from wanpack.runtime.sampling.schedule import dpmpp_sigmas, int_timesteps, with_final_zero


class FlowDPMPPScheduler(FlowScheduler):
    """DPM-Solver++(2M) over shifted linspace(1, 0, N+1)[:N]."""

    name = "dpm++"

    def __init__(self, steps: int, shift: float):
        base = dpmpp_sigmas(steps, shift)
        super().__init__(with_final_zero(base), int_timesteps(base))
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._x0: list[torch.Tensor] = []

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        m0 = self.predict_x0(v, i, x)
        self._x0 = [*self._x0[-1:], m0]
        first_order = len(self._x0) < 2 or i == self.num_steps - 1
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        h = log_snr(s_next) - log_snr(s)
        coeff = (1.0 - s_next) * math.expm1(-h)  # alpha_t * (e^-h - 1)
        x_next = (s_next / s) * x - coeff * m0
        if first_order:
            return x_next
        r0 = (log_snr(s) - log_snr(self.sigmas[i - 1])) / h
        d1 = (m0 - self._x0[0]) * (1.0 / r0)
        return x_next - (0.5 * coeff) * d1
