"""The denoising loop every pipeline shares: noise -> N scheduler steps (with optional batched CFG) -> clean latent."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from wanpack.runtime.sampling.base import FlowScheduler, cfg_combine_batch

# velocity(x, t) -> v. x is [B, C, F, H, W] with B = 2 when CFG is on (cond first, uncond second: the same latent
# twice), t is the scheduler's timestep for this step as a [B] tensor. Returns [B, C, F, H, W].
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int], None]  # (step index, number of steps), called after each step


def initial_noise(shape: Sequence[int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal float32 latent noise drawn on the CPU, so a seed gives the same video on any machine."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(device)


def denoise(velocity: Velocity, latent: torch.Tensor, scheduler: FlowScheduler, guidance: float | None = None,
            on_step: StepCallback | None = None) -> torch.Tensor:  # fmt: skip
    """Run the whole schedule from ``latent`` ([1, C, F, H, W] noise) and return the clean latent.

    With ``guidance`` set, each step makes ONE velocity call on a batch of 2 (cond, uncond) and combines them
    as uncond + g * (cond - uncond): a streamed block's weights then cross the bus once per step, not twice.
    """
    scheduler.reset()
    x = latent
    batch = 2 if guidance is not None else 1
    for i, t in enumerate(scheduler.timesteps):
        tt = t.reshape(1).expand(batch).to(x.device)
        if guidance is None:
            v = velocity(x, tt)
        else:
            v = cfg_combine_batch(velocity(torch.cat([x, x]), tt), guidance)
        x = scheduler.step(v, i, x)
        if on_step is not None:
            on_step(i, scheduler.num_steps)
    return x


def latent_shape(frames: int, height: int, width: int, channels: int = 16) -> tuple[int, int, int, int]:
    """[C, (F-1)/4+1, H/8, W/8]: the VAE compresses 4x in time (first frame alone) and 8x in space."""
    return channels, (frames - 1) // 4 + 1, height // 8, width // 8


def i2v_latent_hw(max_area: int, image_h: int, image_w: int) -> tuple[int, int]:
    """Latent (h, w) for I2V: the pixel area of the chosen size, the input image's aspect, even latent sides.

    lat_h = round(sqrt(max_area * h/w) // 8 // 2 * 2), likewise lat_w with w/h (the reference's rule).
    """
    aspect = image_h / image_w
    lat_h = round(math.sqrt(max_area * aspect) // 8 // 2 * 2)
    lat_w = round(math.sqrt(max_area / aspect) // 8 // 2 * 2)
    return lat_h, lat_w
