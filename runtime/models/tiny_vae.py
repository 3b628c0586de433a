"""Tiny preview decoder for Wan2.1 latents, in the TAEHV layout (madebyollin/taehv; public weights taew2_1).

A 2-D conv net with a one-frame memory per block: about 1/10 of the Wan VAE's cost, with visible quality loss, so it
suits previews (``--tiny-vae PATH``). It reads the DiT's normalized latents as they are and, like the Wan VAE, turns
T latent frames into 4T-3 frames (the network makes 4T and the first 3 are dropped).

Layout of the ``decoder.*`` keys (indices of the reference's sequential decoder; widths W = 256, 128, 64, 64):
  1 conv 16->W0 (+bias)                        3,4,5 / 9,10,11 / 15,16,17  memory blocks: conv.{0,2,4} (+bias)
  7 / 13 / 19 time-grow 1x1 conv (no bias),     8 / 14 / 20  conv W_i->W_i+1 (no bias)
     strides 1, 2, 2                           22 conv W3->3 (+bias)
Index 0 is a soft clamp tanh(x/3)*3, 2 and 21 are ReLUs, 6/12/18 are 2x nearest upsamples (no weights). A memory block
computes relu(conv(cat[x, x_prev]) + x) with x_prev the block's input one frame earlier (zeros before the first).
The encoder half of the file (``encoder.*``) is not used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from wanpack.errors import SourceError, UsageError
from wanpack.runtime.models.weight_dict import need

Weights = Mapping[str, torch.Tensor]

LATENT_CHANNELS = 16
WIDTHS = (256, 128, 64, 64)
TRIM = 3  # frames the network makes before the first real one
# (memory blocks, time-grow index, time-grow stride, conv index) for each of the three stages
_STAGES = (((3, 4, 5), 7, 1, 8), ((9, 10, 11), 13, 2, 14), ((15, 16, 17), 19, 2, 20))
_CONV_IN, _CONV_OUT = 1, 22


def tiny_vae_tensors(latent_channels: int = LATENT_CHANNELS,
                     widths: tuple[int, ...] = WIDTHS) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Every decoder key of a TAEHV checkpoint with its shape."""
    specs = {f"decoder.{_CONV_IN}.weight": (widths[0], latent_channels, 3, 3), f"decoder.{_CONV_IN}.bias": (widths[0],)}
    for stage, (blocks, grow, stride, conv) in enumerate(_STAGES):
        n = widths[stage]
        for b in blocks:
            for j, cin in ((0, 2 * n), (2, n), (4, n)):
                specs[f"decoder.{b}.conv.{j}.weight"] = (n, cin, 3, 3)
                specs[f"decoder.{b}.conv.{j}.bias"] = (n,)
        specs[f"decoder.{grow}.conv.weight"] = (n * stride, n, 1, 1)
        specs[f"decoder.{conv}.weight"] = (widths[stage + 1], n, 3, 3)
    specs[f"decoder.{_CONV_OUT}.weight"] = (3, widths[3], 3, 3)
    specs[f"decoder.{_CONV_OUT}.bias"] = (3,)
    return specs


def load_tiny_vae(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the decoder weights of a taew2_1 .safetensors or .pth file (never unpickling code) and check them."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"tiny VAE file {path} does not exist - pass the path of taew2_1.safetensors or taew2_1.pth")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any parse failure of a user-supplied file is the same user-facing error
        raise SourceError(f"cannot read tiny VAE {path}: not a safetensors or weights-only .pth file "
                          f"({type(err).__name__}) - pass an intact taew2_1 file") from err  # fmt: skip
    if not isinstance(state, dict):
        raise SourceError(f"tiny VAE {path} is not a state dict - pass taew2_1.safetensors or taew2_1.pth")
    weights = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("decoder.")}
    return check_tiny_vae(_fit_time_grow(weights), str(path))


def _fit_time_grow(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoints trained with a temporal first stage carry 2W rows in the stride-1 time-grow; keep the last W rows
    (the later output frame), as the reference loader does for its stride-1 configuration."""
    key = f"decoder.{_STAGES[0][1]}.conv.weight"
    w = weights.get(key)
    if w is not None and w.dim() == 4 and w.shape[0] > w.shape[1]:
        weights[key] = w[-w.shape[1] :]
    return weights


def check_tiny_vae(weights: dict[str, torch.Tensor], where: str = "tiny VAE") -> dict[str, torch.Tensor]:
    """Raise SourceError unless ``weights`` is a 16-channel TAEHV decoder; widths are read from the weights."""
    first = weights.get(f"decoder.{_CONV_IN}.weight")
    if first is None or first.dim() != 4:
        raise SourceError(f"{where} has no TAEHV decoder (decoder.1.weight) - pass the taew2_1 weights")
    if first.shape[1] != LATENT_CHANNELS:
        raise SourceError(f"{where} decodes {first.shape[1]}-channel latents, Wan2.1 has {LATENT_CHANNELS} - "
                          "use taew2_1 (taew2_2 is for Wan2.2)")  # fmt: skip
    widths = []
    for idx in (_CONV_IN, 8, 14, 20):
        t = weights.get(f"decoder.{idx}.weight")
        if t is None or t.dim() != 4:
            raise SourceError(f"{where}: decoder.{idx}.weight is missing - this is not a taew2_1 TAEHV file")
        widths.append(t.shape[0])
    for name, shape in tiny_vae_tensors(LATENT_CHANNELS, tuple(widths)).items():
        got = weights.get(name)
        if got is None or tuple(got.shape) != shape:
            found = "missing" if got is None else f"shape {tuple(got.shape)}"
            raise SourceError(f"{where}: {name} is {found}, expected {shape} - this is not a taew2_1 TAEHV file")
    return weights


# --------------------------------------------------------------------------------------------------------- decode


def _conv(weights: Weights, name: str, x: torch.Tensor, pad: int = 1) -> torch.Tensor:
    w = need(weights, name + ".weight", "tiny VAE").to(x.dtype)
    b = weights.get(name + ".bias")
    return F.conv2d(x, w, None if b is None else b.to(x.dtype), padding=pad)


def _memory_block(weights: Weights, p: str, x: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [B, k, C, H, W] (k frames in time order) -> same; memory[p] holds the input frame before this chunk."""
    b, k, c, h, w = x.shape
    prev = memory.get(p)
    prev = torch.zeros_like(x[:, :1]) if prev is None else prev
    past = torch.cat([prev, x[:, :-1]], dim=1)
    memory[p] = x[:, -1:].clone()
    flat = x.reshape(b * k, c, h, w)
    y = _conv(weights, p + ".conv.0", torch.cat([flat, past.reshape(b * k, c, h, w)], dim=1)).relu_()
    y = _conv(weights, p + ".conv.2", y).relu_()
    y = _conv(weights, p + ".conv.4", y)
    return y.add_(flat).relu_().view(b, k, c, h, w)


def _chunk(weights: Weights, z: torch.Tensor, memory: dict[str, torch.Tensor]) -> torch.Tensor:
    """One latent frame -> 4 frames. z [B, 16, h, w] -> [B, 4, 3, 8h, 8w] in [0, 1]."""
    b = z.shape[0]
    x = _conv(weights, f"decoder.{_CONV_IN}", torch.tanh(z / 3) * 3).relu_().unsqueeze(1)
    for blocks, grow, stride, conv in _STAGES:
        for idx in blocks:
            x = _memory_block(weights, f"decoder.{idx}", x, memory)
        k, c, h, w = x.shape[1:]
        x = F.interpolate(x.reshape(b * k, c, h, w), scale_factor=2.0, mode="nearest")
        x = F.conv2d(x, need(weights, f"decoder.{grow}.conv.weight", "tiny VAE").to(x.dtype))  # [b*k, s*c, 2h, 2w]
        x = x.reshape(b * k * stride, c, 2 * h, 2 * w)  # each frame's channel groups become consecutive frames
        x = _conv(weights, f"decoder.{conv}", x)
        x = x.view(b, k * stride, *x.shape[1:])
    k, c, h, w = x.shape[1:]
    y = _conv(weights, f"decoder.{_CONV_OUT}", x.reshape(b * k, c, h, w).relu_())
    return y.clamp_(0.0, 1.0).view(b, k, 3, h, w)


def tiny_decode_frames(weights: Weights, latents: torch.Tensor, *,
                       dtype: torch.dtype = torch.float32) -> Iterator[torch.Tensor]:  # fmt: skip
    """Normalized latents -> frames in [-1, 1], one latent frame at a time (memory independent of length).

    latents [B, 16, T, h, w] -> yields [B, 3, 1, 8h, 8w], then T-1 chunks of [B, 3, 4, 8h, 8w], float32.
    """
    if latents.dim() == 4:
        latents = latents.unsqueeze(0)
    if latents.dim() != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise UsageError(f"tiny VAE needs latents [B, {LATENT_CHANNELS}, T, h, w], got {tuple(latents.shape)}")
    memory: dict[str, torch.Tensor] = {}
    for t in range(latents.shape[2]):
        frames = _chunk(weights, latents[:, :, t].to(dtype), memory)
        if t == 0:
            frames = frames[:, TRIM:]
        yield frames.float().mul_(2).sub_(1).permute(0, 2, 1, 3, 4)


def tiny_decode(weights: Weights, latents: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                out_device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """latents [B, 16, T, h, w] -> video [B, 3, 4T-3, 8h, 8w] in [-1, 1], float32, gathered on ``out_device``."""
    device = torch.device(out_device) if out_device is not None else latents.device
    return torch.cat([f.to(device) for f in tiny_decode_frames(weights, latents, dtype=dtype)], dim=2)
