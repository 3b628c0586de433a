"""VAE on a CUDA device: same numbers as on the CPU, and peak VRAM within the memory model that sizes tiles.

Skipped without CUDA (conftest). cuDNN may run fp32 convolutions in TF32, hence the 2e-2 tolerance against the CPU.
"""

from __future__ import annotations

import pytest
import torch

from wanpack.convert.synth import random_tensor
from wanpack.manifests.arch import encoder_config, vae_tensors
from wanpack.runtime.models import vae, vae_tiling

pytestmark = pytest.mark.gpu
GIB = 2**30


def _weights(cfg, device):
    return {s.name: random_tensor(s, 0, torch.float32).to(device) for s in vae_tensors(cfg)}


@torch.inference_mode()
def test_cuda_matches_cpu():
    cfg = encoder_config("vae", dim_scale="tiny")
    cpu, gpu = _weights(cfg, "cpu"), _weights(cfg, "cuda")
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    lat = vae.encode(cpu, video, cfg)
    torch.testing.assert_close(vae.encode(gpu, video.cuda(), cfg).cpu(), lat, atol=2e-2, rtol=0)
    torch.testing.assert_close(vae.decode(gpu, lat.cuda(), cfg).cpu(), vae.decode(cpu, lat, cfg), atol=2e-2, rtol=0)
    out16 = vae.decode(gpu, lat.cuda(), cfg, dtype=torch.bfloat16)
    assert out16.dtype == torch.float32 and torch.isfinite(out16).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_peak_memory_within_estimate(dtype):
    """Full-size VAE, one 32x32-latent tile, 3 latent frames: peak allocated <= the per-pixel estimate x pixels."""
    cfg = encoder_config("vae")
    weights = _weights(cfg, "cuda")
    z = torch.randn(1, 16, 3, 32, 32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for chunk in vae.decode_frames(weights, z, cfg, dtype=dtype):
        del chunk
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= vae_tiling.decode_bytes_per_pixel(cfg, dtype) * 32 * 32 * 64


@pytest.mark.slow
@torch.inference_mode()
def test_720p_decode_fits_budget():
    """81 frames at 720p, bf16, tiled for a 3 GiB budget, frames gathered on the CPU: peak VRAM stays under it."""
    cfg = encoder_config("vae")
    weights = {k: v.to(torch.bfloat16) for k, v in _weights(cfg, "cuda").items()}
    z = torch.randn(1, 16, 21, 90, 160, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    video = vae_tiling.decode_within(weights, z, cfg, 3 * GIB, dtype=torch.bfloat16, out_device="cpu")
    torch.cuda.synchronize()
    assert video.shape == (1, 3, 81, 720, 1280)
    assert torch.cuda.max_memory_allocated() - base <= 3 * GIB
