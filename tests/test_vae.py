"""Wan2.1 VAE vs diffusers' AutoencoderKLWan on the same tiny random weights, plus causality and input checks.

Tolerances (float32, CPU): encode and decode agree with diffusers to 1e-4 absolute (observed ~1e-6).
"""

from __future__ import annotations

import pytest
import torch
from vae_reference import diffusers_name, diffusers_vae

from wanpack.convert.synth import random_tensor, synth_pth
from wanpack.errors import PackFormatError, UsageError, WanpackError
from wanpack.manifests.arch import encoder_config, vae_tensors
from wanpack.runtime.models import vae

CFG = encoder_config("vae", dim_scale="tiny")
ATOL = 1e-4


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Tiny VAE weights written as the hub's Wan2.1_VAE.pth and read back the way the runtime would."""
    path = synth_pth(tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth", CFG, seed=3)
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(state):
    return diffusers_vae(state, CFG)


def _stats():
    mean = torch.tensor(CFG.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(CFG.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def _video(frames=9, h=32, w=32, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("dim_scale", ["tiny", "full"])
def test_key_list_matches_diffusers_model(dim_scale):
    """manifests.arch.vae_tensors names exactly the parameters of diffusers' model (same shapes, none missing)."""
    from diffusers import AutoencoderKLWan

    cfg = encoder_config("vae", dim_scale=dim_scale)
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {diffusers_name(s.name, cfg): s.shape for s in vae_tensors(cfg)}
    assert ours == theirs
    assert len(ours) == 194


@pytest.mark.parametrize(("frames", "h", "w"), [(9, 32, 32), (5, 16, 24)])
def test_encode_matches_diffusers(state, reference, frames, h, w):
    video = _video(frames, h, w)
    ours = vae.encode(state, video, CFG)
    with torch.no_grad():
        mu = reference.encode(video).latent_dist.mean
    mean, std = _stats()
    assert ours.shape == (1, 16, (frames - 1) // 4 + 1, h // 8, w // 8)
    torch.testing.assert_close(ours, (mu - mean) / std, atol=ATOL, rtol=0)


def test_decode_matches_diffusers(state, reference):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 3, 4, 4, generator=g)
    ours = vae.decode(state, latents, CFG)
    mean, std = _stats()
    with torch.no_grad():
        theirs = reference.decode(latents * std + mean).sample
    assert ours.shape == (1, 3, 9, 32, 32)
    assert (ours.abs() < 0.99).float().mean() > 0.5  # not a comparison of saturated outputs
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_round_trip_shapes_and_batch(state):
    video = _video(5, 16, 16, batch=2)
    latents = vae.encode(state, video, CFG)
    out = vae.decode(state, latents, CFG)
    assert out.shape == video.shape and out.abs().max() <= 1.0
    one = vae.decode(state, latents[1:], CFG)
    torch.testing.assert_close(out[1:], one, atol=1e-5, rtol=0)


def test_encode_is_causal(state):
    """The first latents of a long video equal the latents of its first frames alone (the cache carries the past)."""
    video = _video(9, 16, 16, seed=4)
    torch.testing.assert_close(vae.encode(state, video[:, :, :5], CFG), vae.encode(state, video, CFG)[:, :, :2],
                               atol=1e-5, rtol=0)  # fmt: skip


def test_decode_is_causal_and_streams(state):
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 16, 3, 2, 2, generator=g)
    chunks = list(vae.decode_frames(state, latents, CFG))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    full = torch.cat(chunks, 2)
    torch.testing.assert_close(vae.decode(state, latents[:, :, :2], CFG), full[:, :, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(vae.decode(state, latents, CFG, out_device="cpu"), full, atol=0, rtol=0)


def test_bf16_activations_close_to_fp32(state):
    """bf16 activations: a few percent off fp32 on these random weights (stated bound: mean |diff| < 0.03)."""
    video = _video(5, 16, 16, seed=6)
    lat32 = vae.encode(state, video, CFG)
    lat16 = vae.encode(state, video, CFG, dtype=torch.bfloat16)
    assert lat16.dtype == torch.float32
    assert (lat16 - lat32).abs().mean() < 0.03 * lat32.abs().mean() + 0.01
    out32 = vae.decode(state, lat32, CFG)
    out16 = vae.decode(state, lat32, CFG, dtype=torch.bfloat16)
    assert (out16 - out32).abs().mean() < 0.03


def test_bf16_weights_are_cast(state):
    """A pack may store the VAE in bf16: the result equals fp32 math on the bf16-rounded weights."""
    bf = {k: v.to(torch.bfloat16) for k, v in state.items()}
    rounded = {k: v.float() for k, v in bf.items()}
    video = _video(5, 16, 16, seed=7)
    torch.testing.assert_close(vae.encode(bf, video, CFG), vae.encode(rounded, video, CFG), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("frames", "h", "w", "match"), [
    (8, 32, 32, "4n\\+1"), (6, 32, 32, "4n\\+1"), (0, 32, 32, "4n\\+1"),
    (5, 30, 32, "height 30"), (5, 32, 20, "width 20"), (5, 0, 32, "height 0"),
])  # fmt: skip
def test_bad_video_sizes_raise(state, frames, h, w, match):
    with pytest.raises(UsageError, match=match):
        vae.encode(state, torch.zeros(1, 3, frames, h, w), CFG)


def test_pipeline_size_check_uses_16():
    vae.check_video_size(81, 480, 832, multiple=16)
    with pytest.raises(WanpackError, match="multiple of 16 - use e.g. 32"):
        vae.check_video_size(81, 24, 832, multiple=16)
    with pytest.raises(WanpackError, match="use 77 or 81 frames"):
        vae.check_video_size(80, 480, 832, multiple=16)


def test_bad_tensors_raise(state):
    with pytest.raises(UsageError, match="3 colour channels"):
        vae.encode(state, torch.zeros(1, 4, 5, 16, 16), CFG)
    with pytest.raises(UsageError, match="channels"):
        vae.decode(state, torch.zeros(1, 8, 2, 2, 2), CFG)
    with pytest.raises(UsageError, match="shape"):
        vae.encode(state, torch.zeros(3, 16, 16), CFG)


def test_check_weights(state):
    vae.check_weights(state, CFG)
    decoder_only = {k: v for k, v in state.items() if not k.startswith(("encoder.", "conv1."))}
    vae.check_weights(decoder_only, CFG, part="decoder")
    with pytest.raises(PackFormatError, match="encoder.conv1.weight is missing"):
        vae.check_weights(decoder_only, CFG)
    bad = dict(state)
    bad["decoder.head.2.weight"] = torch.zeros(3, 4, 3, 3, 3)
    with pytest.raises(PackFormatError, match="decoder.head.2.weight has shape"):
        vae.check_weights(bad, CFG, part="decoder")


def test_full_size_layout_params():
    """The full config's key list adds up to the 126.9M parameters of Wan2.1_VAE.pth (507,609,880 bytes fp32)."""
    specs = vae_tensors(encoder_config("vae"))
    params = sum(torch.Size(s.shape).numel() for s in specs)
    assert round(params / 1e6, 1) == 126.9
    assert random_tensor(specs[0], 0, torch.float32).shape == specs[0].shape


def test_missing_weight_during_decode_is_a_pack_error(state):
    partial = {k: v for k, v in state.items() if k != "decoder.middle.1.proj.bias"}
    with pytest.raises(PackFormatError, match="decoder.middle.1.proj.bias"):
        vae.decode(partial, torch.zeros(1, 16, 1, 2, 2), CFG)
