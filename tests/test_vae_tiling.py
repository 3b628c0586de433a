"""Spatial tiling of the Wan2.1 VAE: geometry, blending, agreement with the untiled pass, and the memory budget.

A randomly initialised VAE's middle attention mixes the whole frame strongly, which a trained VAE does not rely on,
so agreement is measured on the same weights with that attention's output projection zeroed (a local network). The
blending itself is checked exactly with a stand-in network that has no spatial context.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wanpack.convert.synth import random_tensor
from wanpack.errors import UsageError
from wanpack.manifests.arch import encoder_config, vae_tensors
from wanpack.runtime.models import vae, vae_tiling
from wanpack.runtime.models.vae_tiling import (
    Tiling,
    decode_bytes_per_pixel,
    decode_tiled,
    encode_tiled,
    tile_starts,
    tiling_for_budget,
)

CFG = encoder_config("vae", dim_scale="tiny")
GIB = 2**30


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return {s.name: random_tensor(s, 11, torch.float32) for s in vae_tensors(CFG)}


@pytest.fixture(scope="module")
def local_state(state) -> dict[str, torch.Tensor]:
    out = dict(state)
    for side in ("encoder", "decoder"):
        name = f"{side}.middle.1.proj.weight"
        out[name] = torch.zeros_like(state[name])
    return out


def _smooth(channels: int, frames: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency content: a 3x3 random grid per frame, bilinearly stretched."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, channels, frames, 3, 3, generator=g)
    return F.interpolate(base, size=(frames, h, w), mode="trilinear", align_corners=True)


@pytest.mark.parametrize(("size", "tile", "overlap"), [(90, 40, 8), (160, 48, 8), (60, 60, 8), (17, 16, 8), (33, 16, 4)])
def test_tile_starts_cover_with_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == size or (tile >= size and starts == [0])
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= overlap  # neighbours share at least the requested overlap
        assert b > a


def test_single_tile_is_exact(state):
    latents = _smooth(16, 2, 4, 4)
    full = vae.decode(state, latents, CFG)
    torch.testing.assert_close(decode_tiled(state, latents, CFG, Tiling((4, 4), (2, 2))), full, atol=1e-6, rtol=0)


def _pointwise_decode(weights, latents, cfg, dtype=torch.float32):
    """A stand-in decoder with no spatial context: tiling it must be exact, which isolates geometry and blending."""
    x = latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2).tanh()
    yield x[:, :, :1]
    for t in range(1, x.shape[2]):
        yield x[:, :, t : t + 1].repeat(1, 1, 4, 1, 1) * torch.tensor([1.0, 0.5, -0.5, -1.0]).view(1, 1, 4, 1, 1)


def _pointwise_encode(weights, video, cfg, dtype=torch.float32):
    pooled = F.avg_pool3d(video, (1, 8, 8))
    return torch.cat([pooled[:, :, :1], pooled[:, :, 1::4]], 2).repeat(1, 6, 1, 1, 1)[:, :16]


@pytest.mark.parametrize("tiling", [Tiling((6, 6), (2, 2)), Tiling((5, 7), (2, 3)), Tiling((4, 4), (0, 0))])
def test_blending_is_exact_without_spatial_context(monkeypatch, tiling):
    """Weights of overlapping tiles sum to one and every pixel is covered (tolerance 1e-6)."""
    monkeypatch.setattr(vae_tiling, "decode_frames", _pointwise_decode)
    monkeypatch.setattr(vae_tiling, "encode", _pointwise_encode)
    latents = _smooth(16, 3, 13, 11, seed=5) * 2
    want = torch.cat(list(_pointwise_decode(None, latents, CFG)), 2)
    torch.testing.assert_close(decode_tiled({}, latents, CFG, tiling), want, atol=1e-6, rtol=0)
    video = torch.rand(1, 3, 9, 13 * 8, 11 * 8)
    want = _pointwise_encode(None, video, CFG)
    torch.testing.assert_close(encode_tiled({}, video, CFG, tiling), want, atol=1e-6, rtol=0)


def test_decode_tiled_close_to_untiled(local_state):
    """Real network, tiles of 8 latents (smaller than its receptive field, to stay fast on CPU): blending halves the
    error of hard seams, and the mean |diff| stays < 0.06 on outputs in [-1, 1] (observed ~0.04)."""
    latents = _smooth(16, 2, 12, 12, seed=1)
    full = vae.decode(local_state, latents, CFG)
    blended = (decode_tiled(local_state, latents, CFG, Tiling((8, 8), (4, 4))) - full).abs().mean()
    hard = (decode_tiled(local_state, latents, CFG, Tiling((6, 6), (0, 0))) - full).abs().mean()
    assert full.std() > 0.1
    assert blended < 0.06
    assert blended < hard / 2


def test_encode_tiled_close_to_untiled(local_state):
    """Same for the encoder: mean |diff| < 0.03 on latents of std ~0.4 (observed ~0.017), half the hard-seam error."""
    video = _smooth(3, 5, 64, 64, seed=4).clamp(-1, 1)
    full = vae.encode(local_state, video, CFG)
    blended = (encode_tiled(local_state, video, CFG, Tiling((6, 6), (2, 2))) - full).abs().mean()
    hard = (encode_tiled(local_state, video, CFG, Tiling((4, 4), (0, 0))) - full).abs().mean()
    assert blended < 0.03
    assert blended < hard / 2


def test_decode_tiled_to_cpu_and_no_gaps(state):
    latents = _smooth(16, 2, 7, 5, seed=3)
    out = decode_tiled(state, latents, CFG, Tiling((4, 4), (2, 2)), out_device="cpu")
    assert out.shape == (1, 3, 5, 56, 40) and torch.isfinite(out).all() and out.abs().max() <= 1.0


def test_budget_picks_tiles_that_fit():
    full = encoder_config("vae")
    per_px = decode_bytes_per_pixel(full)
    assert decode_bytes_per_pixel(full, torch.bfloat16) < per_px
    for lat_h, lat_w in ((60, 104), (90, 160)):
        assert tiling_for_budget(full, lat_h, lat_w, 1e15) is None
        for budget in (1.5 * GIB, 3 * GIB, 6 * GIB):
            tiling = tiling_for_budget(full, lat_h, lat_w, budget)
            th, tw = tiling.tile
            assert th * tw * 64 * per_px <= budget
            assert len(tile_starts(lat_h, th, 8)) * len(tile_starts(lat_w, tw, 8)) >= 2
    with pytest.raises(UsageError, match="VAE budget"):
        tiling_for_budget(full, 90, 160, 0.01 * GIB)


def test_bad_tiling_raises():
    with pytest.raises(UsageError, match="overlap"):
        Tiling((8, 8), (5, 2))
    with pytest.raises(UsageError, match="overlap"):
        Tiling((0, 8), (0, 0))


def test_within_budget_dispatch(state, monkeypatch):
    latents = _smooth(16, 2, 4, 4, seed=6)
    torch.testing.assert_close(vae_tiling.decode_within(state, latents, CFG, 1e12), vae.decode(state, latents, CFG),
                               atol=0, rtol=0)  # fmt: skip
    video = _smooth(3, 5, 32, 32, seed=7)
    torch.testing.assert_close(vae_tiling.encode_within(state, video, CFG, 1e12), vae.encode(state, video, CFG),
                               atol=0, rtol=0)  # fmt: skip
    monkeypatch.setattr(vae_tiling, "tiling_for_budget", lambda *a, **k: Tiling((3, 3), (1, 1)))
    torch.testing.assert_close(vae_tiling.decode_within(state, latents, CFG, 1.0),
                               decode_tiled(state, latents, CFG, Tiling((3, 3), (1, 1))), atol=0, rtol=0)  # fmt: skip


def test_decode_plan_prefers_fp32_untiled_then_bf16_untiled_on_a_gpu():
    from wanpack.runtime.pipeline import vae_decode_plan

    full = encoder_config("vae")
    need32 = 60 * 104 * 64 * decode_bytes_per_pixel(full)
    need16 = 60 * 104 * 64 * decode_bytes_per_pixel(full, torch.bfloat16)
    assert vae_decode_plan(full, 60, 104, need32, None, on_cuda=True) == ("fp32", None)
    assert vae_decode_plan(full, 60, 104, need16, None, on_cuda=True) == ("bf16", None)
    dtype, tiles = vae_decode_plan(full, 60, 104, need16, None, on_cuda=False)  # the CPU keeps fp32 and tiles
    assert dtype == "fp32" and tiles is not None
    dtype, tiles = vae_decode_plan(full, 60, 104, need16 / 2, None, on_cuda=True)  # bf16 in fewer tiles than fp32
    assert dtype == "bf16" and tiles.tile[0] * tiles.tile[1] > tiling_for_budget(full, 60, 104, need16 / 2).tile[0] * \
        tiling_for_budget(full, 60, 104, need16 / 2).tile[1]
    # asked for: kept, tiled if it must be
    dtype, tiles = vae_decode_plan(full, 60, 104, need16, "fp32", on_cuda=True)
    assert dtype == "fp32" and tiles is not None
    assert vae_decode_plan(full, 60, 104, need16, "bf16", on_cuda=False) == ("bf16", None)
