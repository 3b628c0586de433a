"""Flow-matching samplers (UniPC, DPM++, Euler, the distilled 4-step schedule) and classifier-free guidance."""

from __future__ import annotations

from collections.abc import Sequence

from wanpack.errors import UsageError
from wanpack.manifests.run_config import DISTILL_STEP_LIST, SAMPLERS
from wanpack.runtime.sampling.base import FlowScheduler, cfg_combine, cfg_combine_batch
from wanpack.runtime.sampling.dpmpp import FlowDPMPPScheduler
from wanpack.runtime.sampling.euler import DistillEulerScheduler, FlowEulerScheduler
from wanpack.runtime.sampling.loop import denoise, i2v_latent_hw, initial_noise, latent_shape
from wanpack.runtime.sampling.unipc import FlowUniPCScheduler

__all__ = [
    "DISTILL_STEP_LIST",
    "SAMPLERS",
    "DistillEulerScheduler",
    "FlowDPMPPScheduler",
    "FlowEulerScheduler",
    "FlowScheduler",
    "FlowUniPCScheduler",
    "cfg_combine",
    "cfg_combine_batch",
    "denoise",
    "i2v_latent_hw",
    "initial_noise",
    "latent_shape",
    "make_scheduler",
]


def make_scheduler(sampler: str, steps: int, shift: float, step_list: Sequence[int] | None = None) -> FlowScheduler:
    """The named sampler; ``distill`` uses ``step_list`` (default [1000, 750, 500, 250]) and ignores ``steps``."""
    if steps < 1:
        raise UsageError(f"steps must be at least 1, got {steps} - pass --steps 1 or more")
    if shift <= 0:
        raise UsageError(f"shift must be positive, got {shift} - Wan uses 5.0 (3.0 for I2V at 480p)")
    if sampler == "unipc":
        return FlowUniPCScheduler(steps, shift)
    if sampler == "dpm++":
        return FlowDPMPPScheduler(steps, shift)
    if sampler == "euler":
        return FlowEulerScheduler(steps, shift)
    if sampler == "distill":
        return DistillEulerScheduler(step_list if step_list else DISTILL_STEP_LIST, shift)
    raise UsageError(f"unknown sampler {sampler!r} - choose one of: {', '.join(SAMPLERS)}")
