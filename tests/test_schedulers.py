"""Samplers against diffusers' independent implementations configured for flow matching, on a fixed fake model.

Schedules (sigmas, timesteps) must match exactly where both sides compute in float64 then round to float32 (UniPC,
DPM++), and to 1 float32 ulp where diffusers shifts in float32 (Euler). Trajectories: our scalar coefficients are
float64, diffusers' float32, so states agree to atol/rtol 2e-5 after up to 50 steps (observed ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanpack.errors import UsageError
from wanpack.runtime.sampling import (
    SAMPLERS,
    DistillEulerScheduler,
    FlowDPMPPScheduler,
    FlowEulerScheduler,
    FlowUniPCScheduler,
    cfg_combine,
    cfg_combine_batch,
    denoise,
    i2v_latent_hw,
    initial_noise,
    latent_shape,
    make_scheduler,
)

# diffusers' DPM scheduler trips a numpy 2 copy-keyword DeprecationWarning inside its own code.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOL = {"atol": 2e-5, "rtol": 2e-5}
SHAPE = (1, 4, 3, 6, 5)


def fake_model(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """A smooth, nonlinear, time-dependent velocity field (so multistep history matters)."""
    g = torch.Generator().manual_seed(7)
    c = torch.randn(SHAPE, generator=g)
    tt = float(t) / 1000.0
    return 0.6 * torch.tanh(x) - 0.4 * c + 0.3 * torch.sin(3.0 * tt + x) * (1.0 - tt)


def start() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def run_ours(sched, x):
    states = []
    for i, t in enumerate(sched.timesteps):
        x = sched.step(fake_model(x, t), i, x)
        states.append(x)
    return states


def run_diffusers(sched, x):
    states = []
    for t in sched.timesteps:
        x = sched.step(fake_model(x, t), t, x, return_dict=False)[0]
        states.append(x)
    return states


def assert_same_trajectory(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.isfinite(a).all(), f"step {i} not finite"
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i: f"step {i}: {m}")


def reference_unipc_base(steps: int) -> np.ndarray:
    """Wan's FlowUniPC: np.linspace(sigma_max, sigma_min, N+1)[:-1], sigma_max = float32(1 - 0.001), sigma_min = 0."""
    sigma_max = float(np.float32(1.0 - 0.001))
    return np.linspace(sigma_max, 0.0, steps + 1)[:-1].copy()


def diffusers_unipc(steps: int, shift: float):
    from diffusers import UniPCMultistepScheduler  # imported here: the GPU test below runs where diffusers is absent

    sched = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", predict_x0=True,
        solver_type="bh2", lower_order_final=True, use_flow_sigmas=True, flow_shift=shift, final_sigmas_type="zero",
    )  # fmt: skip
    sched.set_timesteps(sigmas=reference_unipc_base(steps))
    return sched


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (2, 5.0), (3, 3.0), (10, 1.0), (40, 3.0), (50, 5.0)])
def test_unipc_schedule_matches_diffusers(steps, shift):
    ours, theirs = FlowUniPCScheduler(steps, shift), diffusers_unipc(steps, shift)
    assert ours.timesteps.dtype == torch.int64
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.sigmas == theirs.sigmas.tolist()
    assert ours.sigmas[-1] == 0.0 and len(ours.sigmas) == steps + 1


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (2, 5.0), (3, 3.0), (10, 1.0), (40, 3.0), (50, 5.0)])
def test_unipc_trajectory_matches_diffusers(steps, shift):
    x = start()
    assert_same_trajectory(run_ours(FlowUniPCScheduler(steps, shift), x), run_diffusers(diffusers_unipc(steps, shift), x))


def test_unipc_last_step_returns_x0_prediction():
    sched, x = FlowUniPCScheduler(5, 5.0), start()
    for i in range(4):
        x = sched.step(fake_model(x, sched.timesteps[i]), i, x)
    v = fake_model(x, sched.timesteps[4])
    torch.testing.assert_close(sched.step(v, 4, x), x - sched.sigmas[4] * v, atol=0, rtol=0)


def reference_dpmpp_sigmas(steps: int, shift: float) -> np.ndarray:
    """Wan's get_sampling_sigmas: shifted np.linspace(1, 0, N+1)[:N]."""
    s = np.linspace(1, 0, steps + 1)[:steps]
    return shift * s / (1 + (shift - 1) * s)


def diffusers_dpmpp(steps: int, shift: float):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, use_flow_sigmas=True, flow_shift=shift,
        final_sigmas_type="zero",
    )  # fmt: skip
    sched.set_timesteps(steps)
    # diffusers' own flow table starts at 0.999; Wan's dpm++ passes linspace(1, 0) sigmas: install those.
    sigmas = reference_dpmpp_sigmas(steps, shift)
    sched.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    sched.timesteps = torch.from_numpy(sigmas * 1000).to(torch.int64)
    sched.set_begin_index(0)
    return sched


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (3, 5.0), (14, 3.0), (20, 5.0)])
def test_dpmpp_matches_diffusers(steps, shift):
    ours, theirs = FlowDPMPPScheduler(steps, shift), diffusers_dpmpp(steps, shift)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.sigmas == theirs.sigmas.tolist()
    x = start()
    assert_same_trajectory(run_ours(ours, x), run_diffusers(theirs, x))


def diffusers_euler(base_sigmas, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(sigmas=list(base_sigmas))
    return sched


def assert_same_schedule_f32(ours, theirs):
    torch.testing.assert_close(torch.tensor(ours.sigmas), theirs.sigmas, atol=0, rtol=2e-7)  # <= 1 float32 ulp
    assert ours.timesteps.dtype == torch.float32
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, atol=0, rtol=2e-7)


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (4, 5.0), (25, 3.0)])
def test_euler_matches_diffusers(steps, shift):
    ours = FlowEulerScheduler(steps, shift)
    theirs = diffusers_euler(np.linspace(1, 0, steps + 1)[:steps], shift)
    assert_same_schedule_f32(ours, theirs)
    x = start()
    assert_same_trajectory(run_ours(ours, x), run_diffusers(theirs, x))


def test_distill_schedule_numbers():
    sched = DistillEulerScheduler()
    assert sched.num_steps == 4
    np.testing.assert_allclose(sched.sigmas, [1.0, 0.9375, 0.8333333, 0.625, 0.0], rtol=1e-7)
    np.testing.assert_allclose(sched.timesteps.numpy(), [1000.0, 937.5, 833.33333, 625.0], rtol=1e-7)


def test_distill_matches_diffusers_and_update_rule():
    ours = DistillEulerScheduler([1000, 750, 500, 250], 5.0)
    theirs = diffusers_euler([1.0, 0.75, 0.5, 0.25], 5.0)
    assert_same_schedule_f32(ours, theirs)
    x = start()
    assert_same_trajectory(run_ours(ours, x), run_diffusers(theirs, x))
    # The update by hand: x0 = x - s_k v; x <- x0 + s_{k+1} v; the last step returns x0.
    sched, y = DistillEulerScheduler(), start()
    for k, t in enumerate(sched.timesteps):
        v = fake_model(y, t)
        x0 = y - sched.sigmas[k] * v
        expected = x0 if k == 3 else x0 + sched.sigmas[k + 1] * v
        y = sched.step(v, k, y)
        torch.testing.assert_close(y, expected, atol=0, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_state_and_dtype_contract(sampler):
    sched = make_scheduler(sampler, 4, 5.0)
    x = start().to(torch.bfloat16)
    out = sched.step(fake_model(x.float(), sched.timesteps[0]), 0, x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    with pytest.raises(UsageError, match="out of order"):
        sched.step(fake_model(x.float(), sched.timesteps[2]), 2, x)
    sched.reset()
    first = run_ours(sched, start())
    sched.reset()
    again = run_ours(sched, start())
    torch.testing.assert_close(first[-1], again[-1], atol=0, rtol=0)  # reset forgets all history


def test_make_scheduler_rejects_bad_input():
    with pytest.raises(UsageError, match="unknown sampler"):
        make_scheduler("ddim", 10, 5.0)
    with pytest.raises(UsageError, match="steps"):
        make_scheduler("unipc", 0, 5.0)
    with pytest.raises(UsageError, match="shift"):
        make_scheduler("unipc", 10, 0.0)
    with pytest.raises(UsageError, match="denoising_step_list"):
        make_scheduler("distill", 4, 5.0, [1000, 0])
    with pytest.raises(UsageError, match="decrease"):
        make_scheduler("distill", 4, 5.0, [500, 750])


def test_cfg_combine():
    cond, uncond = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    torch.testing.assert_close(cfg_combine(cond, uncond, 5.0), torch.tensor([11.0, 1.0]))
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    batch = torch.stack([cond, uncond])
    torch.testing.assert_close(cfg_combine_batch(batch, 5.0), torch.tensor([[11.0, 1.0]]))
    with pytest.raises(UsageError):
        cfg_combine_batch(cond[None], 5.0)


def test_denoise_loop_batches_cfg_into_one_call():
    """denoise() == a hand-written loop with separate cond/uncond calls; one batched call per step."""
    cond_shift = torch.linspace(-0.5, 0.5, SHAPE[1]).view(1, -1, 1, 1, 1)
    calls = []

    def velocity(x, t):
        calls.append((x.shape[0], t.tolist()))
        branch = torch.tensor([1.0, 0.0][: x.shape[0]]).view(-1, 1, 1, 1, 1)  # cond row gets the extra term
        return fake_model(x, t[0]) + branch * cond_shift

    noise = initial_noise(SHAPE, seed=3)
    out = denoise(velocity, noise, make_scheduler("unipc", 6, 5.0), guidance=5.0)
    assert len(calls) == 6 and all(b == 2 and len(set(t)) == 1 for b, t in calls)

    sched, x = make_scheduler("unipc", 6, 5.0), noise
    for i, t in enumerate(sched.timesteps):
        uncond = fake_model(x, t)
        x = sched.step(cfg_combine(uncond + cond_shift, uncond, 5.0), i, x)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=1e-6)

    steps = []
    plain = denoise(lambda x, t: fake_model(x, t[0]), noise, make_scheduler("distill", 4, 5.0),
                    on_step=lambda i, n: steps.append((i, n)))  # fmt: skip
    assert steps == [(0, 4), (1, 4), (2, 4), (3, 4)] and plain.shape == noise.shape


def test_initial_noise_is_seeded_and_standard():
    a, b = initial_noise((16, 5, 8, 8), 42), initial_noise((16, 5, 8, 8), 42)
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert not torch.equal(a, initial_noise((16, 5, 8, 8), 43))
    assert abs(a.mean().item()) < 0.1 and abs(a.std().item() - 1.0) < 0.1


def test_latent_geometry_matches_the_reference_numbers():
    assert latent_shape(81, 480, 832) == (16, 21, 60, 104)
    assert latent_shape(81, 720, 1280) == (16, 21, 90, 160)
    # An 832x480 image at 480p: sqrt(399360 * 480/832) is 479.99999999999994 in float64, so the reference's floor
    # gives 58 latent rows (464 px), not 60. Reproduced on purpose.
    assert i2v_latent_hw(480 * 832, 480, 832) == (58, 104)
    assert i2v_latent_hw(480 * 832, 1080, 1920) == (58, 104)
    assert i2v_latent_hw(720 * 1280, 720, 1280) == (90, 160)
    assert i2v_latent_hw(480 * 832, 512, 512) == (78, 78)
    # Independent re-statement with numpy: round(sqrt(area * h/w) // 8 // 2 * 2).
    for h, w in [(600, 400), (333, 1000), (1024, 768)]:
        expect = (round(np.sqrt(480 * 832 * h / w) // 8 // 2 * 2), round(np.sqrt(480 * 832 * w / h) // 8 // 2 * 2))
        assert i2v_latent_hw(480 * 832, h, w) == expect


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_matches_cpu(sampler):
    """Samplers are device-agnostic (Python-float coefficients, no host syncs): CUDA follows the CPU trajectory."""
    noise = initial_noise(SHAPE, seed=1)
    cpu = denoise(lambda x, t: fake_model(x, t[0]), noise, make_scheduler(sampler, 8, 5.0), guidance=None)
    gpu = denoise(lambda x, t: fake_model(x.cpu(), t[0].cpu()).cuda(), noise.cuda(), make_scheduler(sampler, 8, 5.0))
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
