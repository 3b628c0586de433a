"""Wan2.1 causal 3-D VAE as functions over the original Wan2.1_VAE.pth weights.

Every tensor is looked up by its original checkpoint name (``manifests.arch.vae_tensors``). Time is causal: each
3-D convolution with a temporal kernel of 3 sees the two input frames before it, carried between chunks in a
``cache`` dict keyed by the convolution's name, so a video is encoded 1 + 4 + 4 + ... frames at a time (one latent
frame per chunk) and decoded one latent frame at a time (1 output frame for the first latent, 4 for each later one).
That chunking is what keeps activation memory independent of the video length.

Activations run in ``dtype`` (float32 by default; bfloat16 halves activation memory); weights are cast to it at use,
RMS normalization and the latent (de)normalization run in float32 whatever ``dtype`` is.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F

from wanpack.errors import PackFormatError, UsageError
from wanpack.manifests.arch import VAEConfig, vae_tensors
from wanpack.runtime.models.weight_dict import need

Weights = Mapping[str, torch.Tensor]
Cache = dict[str, torch.Tensor]

TIME_FACTOR = 4  # frames per latent frame (after the first)
SPACE_FACTOR = 8  # pixels per latent pixel, each side
CACHE_FRAMES = 2  # input frames a temporal-kernel-3 convolution keeps from the previous chunk
_ATTN_SCORES_LIMIT = 1 << 26  # query rows x key columns per attention call before queries are split (256 MB fp32)

# --------------------------------------------------------------------------------------------------------- checks


def check_video_size(frames: int, height: int, width: int, *, multiple: int = SPACE_FACTOR) -> None:
    """Raise UsageError unless frames is 4n+1 and height/width are positive multiples of ``multiple``.

    The VAE needs multiples of 8; the DiT's 2x2 patches make the pipeline need 16, so it passes ``multiple=16``.
    """
    if frames < 1 or (frames - 1) % TIME_FACTOR:
        lo = max(1, (frames - 1) // TIME_FACTOR * TIME_FACTOR + 1)
        raise UsageError(f"frame count {frames} is not 4n+1 - use {lo} or {lo + TIME_FACTOR} frames")
    for side, value in (("height", height), ("width", width)):
        if value < multiple or value % multiple:
            near = max(multiple, round(value / multiple) * multiple)
            raise UsageError(f"video {side} {value} is not a positive multiple of {multiple} - use e.g. {near}")


def check_weights(weights: Weights, cfg: VAEConfig, *, part: str = "") -> None:
    """Raise PackFormatError if a tensor the VAE needs is missing or has the wrong shape.

    ``part`` limits the check to keys starting with it ("encoder", "decoder"); the 1x1x1 convolutions between the
    halves ("conv1" belongs to the encoder side, "conv2" to the decoder side) are included accordingly.
    """
    extra = {"encoder": "conv1.", "decoder": "conv2."}.get(part, "")
    for spec in vae_tensors(cfg):
        if part and not (spec.name.startswith(part + ".") or spec.name.startswith(extra)):
            continue
        t = weights.get(spec.name)
        if t is None:
            raise PackFormatError(f"VAE weight {spec.name} is missing - convert the pack again with the VAE included")
        if tuple(t.shape) != spec.shape:
            raise PackFormatError(
                f"VAE weight {spec.name} has shape {tuple(t.shape)}, expected {spec.shape} - "
                "the VAE config does not match these weights"
            )


# --------------------------------------------------------------------------------------------------------- layers


def _w(weights: Weights, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = need(weights, name, "VAE")
    return t if t.dtype == dtype else t.to(dtype)


def _rms_norm(weights: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    """x / ||x||_channels * sqrt(C) * gamma, normalized in float32. x [B, C, T, H, W]."""
    gamma = _w(weights, name + ".gamma", torch.float32).reshape(-1, 1, 1, 1)
    y = F.normalize(x.float(), dim=1).mul_(math.sqrt(x.shape[1])).mul_(gamma)
    return y.to(x.dtype)


def _causal_conv(weights: Weights, name: str, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
    """3-D convolution padded in time on the left only; the pad is the previous chunk's frames when cached.

    x [B, Cin, T, H, W] -> [B, Cout, T', H, W]; spatial padding is symmetric ("same" for odd kernels).
    """
    w = _w(weights, name + ".weight", x.dtype)
    b = _w(weights, name + ".bias", x.dtype)
    kt, kh, kw = w.shape[2:]
    if kt > 1:
        prev = cache.get(name) if cache is not None else None
        seq = x if prev is None else torch.cat([prev, x], dim=2)
        if cache is not None:
            cache[name] = seq[:, :, -CACHE_FRAMES:].clone()
        missing = (kt - 1) - (seq.shape[2] - x.shape[2])
        x = F.pad(seq, (0, 0, 0, 0, missing, 0)) if missing > 0 else seq
    return F.conv3d(x, w, b, padding=(0, kh // 2, kw // 2))


def _frame_conv(weights: Weights, name: str, x: torch.Tensor, stride: int = 1, pad: int = 1) -> torch.Tensor:
    """A Conv2d applied to every frame. x [B, Cin, T, H, W] -> [B, Cout, T, H', W']."""
    w = _w(weights, name + ".weight", x.dtype).unsqueeze(2)
    b = _w(weights, name + ".bias", x.dtype)
    return F.conv3d(x, w, b, stride=(1, stride, stride), padding=(0, pad, pad))


def _resblock(weights: Weights, p: str, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    """norm-SiLU-conv3 twice plus a (1x1x1 conv when widths differ) shortcut. x [B, Cin, T, H, W] -> [B, Cout, ...]."""
    h = _causal_conv(weights, p + ".shortcut", x, None) if p + ".shortcut.weight" in weights else x
    y = _causal_conv(weights, p + ".residual.2", F.silu(_rms_norm(weights, p + ".residual.0", x), inplace=True), cache)
    y = _causal_conv(weights, p + ".residual.6", F.silu(_rms_norm(weights, p + ".residual.3", y), inplace=True), cache)
    return y.add_(h)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Single-head attention, queries split so the score matrix stays bounded. q/k/v [N, L, C] -> [N, L, C]."""
    n, length, _ = q.shape
    rows = max(1, _ATTN_SCORES_LIMIT // max(1, n * length))
    if rows >= length:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[:, i : i + rows], k, v) for i in range(0, length, rows)], 1)


def _attention_block(weights: Weights, p: str, x: torch.Tensor) -> torch.Tensor:
    """Spatial self-attention inside each frame, one head of width C. x [B, C, T, H, W] -> same."""
    b, c, t, h, w = x.shape
    tokens = _rms_norm(weights, p + ".norm", x).permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
    qkv = F.linear(tokens, _w(weights, p + ".to_qkv.weight", x.dtype).reshape(3 * c, c),
                   _w(weights, p + ".to_qkv.bias", x.dtype))  # fmt: skip
    q, k, v = qkv.chunk(3, dim=-1)
    out = F.linear(_attention(q, k, v), _w(weights, p + ".proj.weight", x.dtype).reshape(c, c),
                   _w(weights, p + ".proj.bias", x.dtype))  # fmt: skip
    return out.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3).add_(x)


def _middle(weights: Weights, p: str, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    x = _resblock(weights, p + ".0", x, cache)
    x = _attention_block(weights, p + ".1", x)
    return _resblock(weights, p + ".2", x, cache)


def _head(weights: Weights, p: str, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    return _causal_conv(weights, p + ".2", F.silu(_rms_norm(weights, p + ".0", x), inplace=True), cache)


def _downsample(weights: Weights, p: str, x: torch.Tensor, cache: Cache, temporal: bool) -> torch.Tensor:
    """Halve H and W (pad right/bottom by one, 3x3 stride 2); in time, convolve [last cached frame, x] with stride 2.

    The first chunk (one frame) passes through time unchanged and only seeds the cache. x [B, C, T, H, W] ->
    [B, C, T', H/2, W/2] with T' = T on the first chunk and T/2 after.
    """
    x = _frame_conv(weights, p + ".resample.1", F.pad(x, (0, 1, 0, 1)), stride=2, pad=0)
    if not temporal:
        return x
    name = p + ".time_conv"
    prev = cache.get(name)
    cache[name] = x[:, :, -1:].clone()
    if prev is None:
        return x
    w = _w(weights, name + ".weight", x.dtype)
    return F.conv3d(torch.cat([prev, x], dim=2), w, _w(weights, name + ".bias", x.dtype), stride=(2, 1, 1))


def _upsample(weights: Weights, p: str, x: torch.Tensor, cache: Cache, temporal: bool) -> torch.Tensor:
    """Double T (temporal variant, after the first chunk), H and W; halve the channels.

    The time convolution makes 2C channels holding two output frames per input frame; the first chunk skips it (one
    latent frame becomes one frame). x [B, C, T, H, W] -> [B, C/2, T or 2T, 2H, 2W].
    """
    if temporal:
        name = p + ".time_conv"
        if name not in cache:
            b, c, _, h, w = x.shape  # seen: the next chunk convolves with zero history, as the reference does
            cache[name] = x.new_zeros((b, c, 0, h, w))
        else:
            y = _causal_conv(weights, name, x, cache)
            b, c2, t, h, w = y.shape
            x = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
    x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")
    return _frame_conv(weights, p + ".resample.1", x)


# --------------------------------------------------------------------------------------------------------- networks


def _encoder_plan(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(kind, weight prefix) of every entry of encoder.downsamples, in order (kinds: res, down2d, down3d)."""
    plan, idx = [], 0
    for level in range(len(cfg.dim_mult)):
        for _ in range(cfg.num_res_blocks):
            plan.append(("res", f"encoder.downsamples.{idx}"))
            idx += 1
        if level != len(cfg.dim_mult) - 1:
            plan.append(("down3d" if cfg.temporal_downsample[level] else "down2d", f"encoder.downsamples.{idx}"))
            idx += 1
    return plan


def _decoder_plan(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(kind, weight prefix) of every entry of decoder.upsamples, in order (kinds: res, up2d, up3d)."""
    temporal_up = tuple(reversed(cfg.temporal_downsample))
    plan, idx = [], 0
    for level in range(len(cfg.dim_mult)):
        for _ in range(cfg.num_res_blocks + 1):
            plan.append(("res", f"decoder.upsamples.{idx}"))
            idx += 1
        if level != len(cfg.dim_mult) - 1:
            plan.append(("up3d" if temporal_up[level] else "up2d", f"decoder.upsamples.{idx}"))
            idx += 1
    return plan


def encoder_chunk(weights: Weights, x: torch.Tensor, cfg: VAEConfig, cache: Cache) -> torch.Tensor:
    """One chunk of frames (1 first, then 4) -> one latent frame of encoder features.

    x [B, 3, 1 or 4, H, W] in the activation dtype -> [B, 2*z_dim, 1, H/8, W/8] (mean and log-variance halves).
    """
    x = _causal_conv(weights, "encoder.conv1", x, cache)
    for kind, p in _encoder_plan(cfg):
        x = _resblock(weights, p, x, cache) if kind == "res" else _downsample(weights, p, x, cache, kind == "down3d")
    x = _middle(weights, "encoder.middle", x, cache)
    return _head(weights, "encoder.head", x, cache)


def decoder_chunk(weights: Weights, z: torch.Tensor, cfg: VAEConfig, cache: Cache) -> torch.Tensor:
    """One latent frame (already through conv2) -> its frames: 1 for the first latent, 4 for each later one.

    z [B, z_dim, 1, h, w] in the activation dtype -> [B, 3, 1 or 4, 8h, 8w], not clamped.
    """
    x = _causal_conv(weights, "decoder.conv1", z, cache)
    x = _middle(weights, "decoder.middle", x, cache)
    for kind, p in _decoder_plan(cfg):
        x = _resblock(weights, p, x, cache) if kind == "res" else _upsample(weights, p, x, cache, kind == "up3d")
    return _head(weights, "decoder.head", x, cache)


def _latent_stats(cfg: VAEConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    return mean, std


def _as_5d(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 4:
        return x.unsqueeze(0)
    if x.dim() != 5:
        raise UsageError(f"{what} must have shape [B, C, T, H, W] or [C, T, H, W], got {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------------------- public


def encode(weights: Weights, video: torch.Tensor, cfg: VAEConfig, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Video in [-1, 1] -> normalized latent mean (mu - latents_mean) / latents_std, float32.

    video [B, 3, F, H, W] (or [3, F, H, W]) with F = 4n+1 and H, W multiples of 8 -> [B, z_dim, n+1, H/8, W/8].
    """
    video = _as_5d(video, "video")
    if video.shape[1] != 3:
        raise UsageError(f"video must have 3 colour channels, got {video.shape[1]} - pass [B, 3, F, H, W]")
    check_video_size(video.shape[2], video.shape[3], video.shape[4])
    cache: Cache = {}
    outs = [encoder_chunk(weights, video[:, :, :1].to(dtype), cfg, cache)]
    for start in range(1, video.shape[2], TIME_FACTOR):
        outs.append(encoder_chunk(weights, video[:, :, start : start + TIME_FACTOR].to(dtype), cfg, cache))
    del cache
    feats = torch.cat(outs, dim=2).float()
    z = cfg.z_dim  # only the mean half of conv1's output is used
    w = _w(weights, "conv1.weight", torch.float32)[:z]
    b = _w(weights, "conv1.bias", torch.float32)[:z]
    mu = F.conv3d(feats, w, b)
    mean, std = _latent_stats(cfg, mu.device)
    return mu.sub_(mean).div_(std)


def decode_frames(weights: Weights, latents: torch.Tensor, cfg: VAEConfig, *,
                  dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:  # fmt: skip
    """Normalized latents -> the video one latent frame at a time, so a caller can write frames as they come.

    latents [B, z_dim, T, h, w] -> yields [B, 3, 1, 8h, 8w] first, then T-1 chunks of [B, 3, 4, 8h, 8w], float32,
    clamped to [-1, 1].
    """
    latents = _as_5d(latents, "latents")
    if latents.shape[1] != cfg.z_dim:
        raise UsageError(f"latents have {latents.shape[1]} channels, the VAE expects {cfg.z_dim}")
    mean, std = _latent_stats(cfg, latents.device)
    z = latents.float() * std + mean
    x = F.conv3d(z, _w(weights, "conv2.weight", torch.float32), _w(weights, "conv2.bias", torch.float32)).to(dtype)
    del z
    cache: Cache = {}
    for t in range(x.shape[2]):
        yield decoder_chunk(weights, x[:, :, t : t + 1], cfg, cache).float().clamp_(-1.0, 1.0)


def decode(weights: Weights, latents: torch.Tensor, cfg: VAEConfig, *, dtype: torch.dtype = torch.float32,
           out_device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """Normalized latents -> video in [-1, 1], float32. latents [B, z_dim, T, h, w] -> [B, 3, 4T-3, 8h, 8w].

    ``out_device`` (default: the latents' device) is where the frames are gathered, e.g. "cpu" to keep them off the GPU.
    """
    device = torch.device(out_device) if out_device is not None else latents.device
    return torch.cat([chunk.to(device) for chunk in decode_frames(weights, latents, cfg, dtype=dtype)], dim=2)
