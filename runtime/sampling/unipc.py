"""Flow-matching UniPC (Zhao et al. 2023): the base Wan2.1 models' default sampler.

Settings are the reference's: order 2, B(h) = e^h - 1 ("bh2"), data (x0) prediction, first step and last step
first order, and the UniC corrector applied on every step after the first. One model evaluation per step.

Notation (per step i, sample at sigma_i): alpha = 1 - sigma, lambda = log(alpha / sigma), h = lambda_next - lambda_i,
m_i = x0 prediction at step i. Scalar coefficients are computed in float64 from the float32 sigmas; tensor arithmetic
runs in float32.
"""

from __future__ import annotations

import math

import torch

from wanpack.runtime.sampling.base import FlowScheduler, log_snr
from wanpack.runtime.sampling.schedule import int_timesteps, unipc_sigmas, with_final_zero


class FlowUniPCScheduler(FlowScheduler):
    """UniPC-2 (bh2, predict x0, lower order at the end) over shifted linspace(0.999, 0, N+1)[:-1]."""

    name = "unipc"

    def __init__(self, steps: int, shift: float):
        base = unipc_sigmas(steps, shift)
        super().__init__(with_final_zero(base), int_timesteps(base))
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._x0: list[torch.Tensor] = []  # x0 predictions, newest last (at most two kept)
        self._prev_sample: torch.Tensor | None = None  # sample the last predictor started from
        self._prev_order = 0

    def _lam(self, i: int) -> float:
        return log_snr(self.sigmas[i])

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        m = self.predict_x0(v, i, x)
        if i > 0 and self._prev_sample is not None:
            x = self._correct(m, i, x)
        self._x0 = [*self._x0[-1:], m]
        order = min(2, self.num_steps - i, len(self._x0))
        self._prev_sample, self._prev_order = x, order
        return self._predict(i, x, order)

    def _base_update(self, x: torch.Tensor, m0: torch.Tensor, src: int, dst: int) -> tuple[torch.Tensor, float, float]:
        """First-order (DPM-Solver++ 1) move from sigma[src] to sigma[dst]; also returns hh = -h and e^hh - 1 = B(h)."""
        hh = -(self._lam(dst) - self._lam(src))
        h_phi_1 = math.expm1(hh)
        alpha_t = 1.0 - self.sigmas[dst]
        x_t = (self.sigmas[dst] / self.sigmas[src]) * x - (alpha_t * h_phi_1) * m0
        return x_t, hh, h_phi_1

    def _predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP: x at sigma_i -> sigma_{i+1} from m_i and (order 2) the difference to m_{i-1}."""
        m0 = self._x0[-1]
        x_t, hh, h_phi_1 = self._base_update(x, m0, i, i + 1)
        if order == 1:
            return x_t
        r1 = (self._lam(i - 1) - self._lam(i)) / -hh
        d1 = (self._x0[-2] - m0) / r1
        alpha_t = 1.0 - self.sigmas[i + 1]
        return x_t - (alpha_t * h_phi_1 * 0.5) * d1  # bh2: B(h) = h*phi_1; rho = 1/2 for order 2

    def _correct(self, m_t: torch.Tensor, i: int, x_t: torch.Tensor) -> torch.Tensor:
        """UniC: redo the last predictor step (sigma_{i-1} -> sigma_i) using the new x0 prediction m_t at sigma_i."""
        order = self._prev_order
        m0 = self._x0[-1]
        x_c, hh, h_phi_1 = self._base_update(self._prev_sample, m0, i - 1, i)
        b = _b_coefficients(hh, h_phi_1, order)
        alpha_t = 1.0 - self.sigmas[i]
        d1_t = m_t - m0
        if order == 1:
            return x_c - (alpha_t * h_phi_1 * 0.5) * d1_t
        r1 = (self._lam(i - 2) - self._lam(i - 1)) / -hh
        d1 = (self._x0[-2] - m0) / r1
        # Solve [[1, 1], [r1, 1]] @ (rho_1, rho_t) = (b1, b2).
        rho_1 = (b[0] - b[1]) / (1.0 - r1)
        rho_t = b[0] - rho_1
        return x_c - (alpha_t * h_phi_1) * (rho_1 * d1 + rho_t * d1_t)


def _b_coefficients(hh: float, h_phi_1: float, order: int) -> list[float]:
    """Right-hand side b_k = phi_{k+1}(hh) * k! / B(h) of the UniPC order conditions, with B(h) = e^hh - 1 (bh2)."""
    b, factorial = [], 1
    h_phi_k = h_phi_1 / hh - 1.0
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return b
