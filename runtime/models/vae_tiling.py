"""Spatial tiling for the Wan2.1 VAE, so a 720p decode fits a small VRAM budget.

The frame is cut into overlapping tiles (in latent pixels); each tile runs through the whole causal encode or decode
on its own (its feature cache lives only while that tile runs), and overlaps are blended with linear ramps that sum to
one, normalized by the accumulated weight. Working memory then scales with the tile's area, not the frame's; the
gathered output (3 x F x H x W float32 for a decode) lives on ``out_device``, which may be the CPU.

Tiles see zero padding where the full frame would show neighbours, and the middle attention only attends inside the
tile, so tiled output is close to, not equal to, untiled output; the overlap hides the seams (docs/VAE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wanpack.errors import UsageError
from wanpack.manifests.arch import VAEConfig
from wanpack.runtime.models.vae import (
    SPACE_FACTOR,
    TIME_FACTOR,
    Weights,
    check_video_size,
    decode,
    decode_frames,
    encode,
)

DEFAULT_OVERLAP = 8  # latent pixels (64 image pixels) shared by neighbouring tiles
MIN_TILE = 16  # latent pixels; smaller tiles lose too much context to look right
WORK_FACTOR = 6  # live activations at the widest full-resolution layer, in units of (frames x channels)
SAFETY = 1.25  # allocator fragmentation and convolution workspaces on top of the estimate


@dataclass(frozen=True)
class Tiling:
    """Tile size and minimum overlap, both in latent pixels (x8 in image pixels), as (height, width)."""

    tile: tuple[int, int]
    overlap: tuple[int, int] = (DEFAULT_OVERLAP, DEFAULT_OVERLAP)

    def __post_init__(self) -> None:
        for t, o in zip(self.tile, self.overlap, strict=True):
            if t < 1 or o < 0 or 2 * o > t:
                raise UsageError(f"VAE tile {self.tile} with overlap {self.overlap} is invalid - "
                                 "use tiles of at least 1 latent pixel and an overlap of at most half a tile")  # fmt: skip


# --------------------------------------------------------------------------------------------------------- geometry


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread starts of tiles of ``tile`` covering [0, size) with at least ``overlap`` shared between tiles."""
    if tile >= size:
        return [0]
    count = 1 + math.ceil((size - tile) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(ov: int, device: torch.device) -> torch.Tensor:
    """Rising weights over an overlap of ``ov`` samples: 0 over the outer quarter (the tile edge, where zero padding
    spoils the output most), linear over the middle half, 1 over the inner quarter. ramp + flipped ramp = 1."""
    pos = (torch.arange(ov, dtype=torch.float32, device=device) + 0.5) / ov
    return ((pos - 0.25) * 2).clamp_(0.0, 1.0)


def _ramp_1d(starts: list[int], i: int, tile: int, scale: int, device: torch.device) -> torch.Tensor:
    """Weights along one axis for tile ``i``: rising over the overlap with the previous tile, falling over the next."""
    n = tile * scale
    w = torch.ones(n, dtype=torch.float32, device=device)
    if i > 0:
        ov = (starts[i - 1] + tile - starts[i]) * scale
        w[:ov] = _ramp(ov, device)
    if i + 1 < len(starts):
        ov = (starts[i] + tile - starts[i + 1]) * scale
        w[n - ov :] = torch.minimum(w[n - ov :], _ramp(ov, device).flip(0))
    return w


def _tiles(lat_h: int, lat_w: int, tiling: Tiling) -> tuple[list[int], list[int], int, int]:
    th, tw = min(tiling.tile[0], lat_h), min(tiling.tile[1], lat_w)
    return tile_starts(lat_h, th, tiling.overlap[0]), tile_starts(lat_w, tw, tiling.overlap[1]), th, tw


# --------------------------------------------------------------------------------------------------------- tiled passes


def decode_tiled(weights: Weights, latents: torch.Tensor, cfg: VAEConfig, tiling: Tiling, *,
                 dtype: torch.dtype = torch.float32, out_device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """Like ``vae.decode``, one spatial tile at a time. latents [B, z_dim, T, h, w] -> [B, 3, 4T-3, 8h, 8w] float32."""
    if latents.dim() == 4:
        latents = latents.unsqueeze(0)
    b, _, t, lat_h, lat_w = latents.shape
    device = torch.device(out_device) if out_device is not None else latents.device
    s = SPACE_FACTOR
    out = torch.zeros(b, 3, TIME_FACTOR * (t - 1) + 1, lat_h * s, lat_w * s, dtype=torch.float32, device=device)
    wsum = torch.zeros(lat_h * s, lat_w * s, dtype=torch.float32, device=device)
    ys, xs, th, tw = _tiles(lat_h, lat_w, tiling)
    for i, y in enumerate(ys):
        wy = _ramp_1d(ys, i, th, s, device)
        for j, x in enumerate(xs):
            weight = wy[:, None] * _ramp_1d(xs, j, tw, s, device)[None, :]
            rows, cols = slice(y * s, (y + th) * s), slice(x * s, (x + tw) * s)
            frame = 0
            for chunk in decode_frames(weights, latents[:, :, :, y : y + th, x : x + tw], cfg, dtype=dtype):
                n = chunk.shape[2]
                out[:, :, frame : frame + n, rows, cols] += chunk.to(device) * weight
                frame += n
            wsum[rows, cols] += weight
    return out.div_(wsum)


def encode_tiled(weights: Weights, video: torch.Tensor, cfg: VAEConfig, tiling: Tiling, *,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """Like ``vae.encode``, one spatial tile at a time (tiles in latent pixels, x8 in the video).

    video [B, 3, F, H, W] -> normalized latents [B, z_dim, (F-1)/4+1, H/8, W/8] float32, on the video's device.
    """
    if video.dim() == 4:
        video = video.unsqueeze(0)
    check_video_size(video.shape[2], video.shape[3], video.shape[4])
    s = SPACE_FACTOR
    lat_h, lat_w = video.shape[3] // s, video.shape[4] // s
    out = torch.zeros(video.shape[0], cfg.z_dim, (video.shape[2] - 1) // TIME_FACTOR + 1, lat_h, lat_w,
                      dtype=torch.float32, device=video.device)  # fmt: skip
    wsum = torch.zeros(lat_h, lat_w, dtype=torch.float32, device=video.device)
    ys, xs, th, tw = _tiles(lat_h, lat_w, tiling)
    for i, y in enumerate(ys):
        wy = _ramp_1d(ys, i, th, 1, video.device)
        for j, x in enumerate(xs):
            weight = wy[:, None] * _ramp_1d(xs, j, tw, 1, video.device)[None, :]
            tile = video[:, :, :, y * s : (y + th) * s, x * s : (x + tw) * s]
            out[:, :, :, y : y + th, x : x + tw] += encode(weights, tile, cfg, dtype=dtype) * weight
            wsum[y : y + th, x : x + tw] += weight
    return out.div_(wsum)


# --------------------------------------------------------------------------------------------------------- budget


def _levels(cfg: VAEConfig) -> list[tuple[float, int, list[int]]]:
    """Decoder levels from latent to full resolution: (pixel fraction, frames per chunk, cached convs' input widths)."""
    mult = list(cfg.dim_mult)
    dims = [cfg.dim * m for m in [mult[-1], *mult[::-1]]]
    temporal_up = tuple(reversed(cfg.temporal_downsample))
    frac, frames = 1.0 / 4 ** (len(mult) - 1), 1
    widths = [cfg.z_dim] + [dims[0]] * 4  # decoder.conv1, middle
    levels = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        cin = cin // 2 if i > 0 else cin
        widths += [cin, cout] + [cout, cout] * cfg.num_res_blocks
        if i == len(mult) - 1:
            widths.append(cout)  # head
            levels.append((frac, frames, widths))
            break
        if temporal_up[i]:
            widths.append(cout)  # time_conv
        levels.append((frac, frames, widths))
        frac, frames, widths = frac * 4, frames * (2 if temporal_up[i] else 1), []
    return levels


def decode_bytes_per_pixel(cfg: VAEConfig, dtype: torch.dtype = torch.float32) -> float:
    """Estimated peak working memory of a decode, per output pixel of the tile (excluding the gathered output).

    Feature caches (2 frames per causal convolution at its level) plus the live activations of the widest layer of the
    busiest level, times SAFETY. A conservative model: benchmarks/vae_bench.py measures the real figure on a GPU.
    """
    item = torch.empty((), dtype=dtype).element_size()
    mult = list(cfg.dim_mult)
    caches = sum(2 * sum(widths) * frac for frac, _, widths in _levels(cfg))
    work = max(frames * frac * max(widths) * WORK_FACTOR for frac, frames, widths in _levels(cfg))
    upsample = TIME_FACTOR * cfg.dim * mult[0] * 2 * 1.5  # last 2-D upsample: 2C channels at full size, then C out
    chunk = TIME_FACTOR * 3 * 4  # the float32 frames a tile hands back per latent frame
    return SAFETY * ((caches + max(work, upsample)) * item + chunk)


def encode_bytes_per_pixel(cfg: VAEConfig, dtype: torch.dtype = torch.float32) -> float:
    """Estimated peak working memory of an encode, per input pixel of the tile; the encoder mirrors the decoder with
    one fewer residual block per level, so the decoder's figure bounds it."""
    return decode_bytes_per_pixel(cfg, dtype)


def tiling_for_budget(cfg: VAEConfig, lat_h: int, lat_w: int, budget_bytes: float, *, dtype: torch.dtype = torch.float32,
                      overlap: int = DEFAULT_OVERLAP) -> Tiling | None:  # fmt: skip
    """Tiles whose estimated working memory fits ``budget_bytes`` with the least total area (overlaps are computed twice),
    then the squarest; None if the whole frame fits.

    Raises UsageError when even MIN_TILE x MIN_TILE latent tiles would not fit.
    """
    per_latent_px = decode_bytes_per_pixel(cfg, dtype) * SPACE_FACTOR**2
    if lat_h * lat_w * per_latent_px <= budget_bytes:
        return None
    best = None
    for ny in range(1, lat_h + 1):
        th = _tile_for_count(lat_h, ny, overlap)
        if th is None:
            break
        for nx in range(1, lat_w + 1):
            tw = _tile_for_count(lat_w, nx, overlap)
            if tw is None:
                break
            if th * tw * per_latent_px <= budget_bytes and min(th, tw) >= min(MIN_TILE, lat_h, lat_w):
                key = (ny * nx * th * tw, abs(math.log(th / tw)))  # least computed area (overlaps count twice)
                if best is None or key < best[0]:
                    best = (key, Tiling((th, tw), (min(overlap, th // 2), min(overlap, tw // 2))))
                break
    if best is None:
        need = MIN_TILE * MIN_TILE * per_latent_px / 2**30
        raise UsageError(f"VAE budget {budget_bytes / 2**30:.2f} GiB is below the {need:.2f} GiB the smallest tile "
                         "needs - raise the VAE budget or use bf16 VAE activations")  # fmt: skip
    return best[1]


def _tile_for_count(size: int, count: int, overlap: int) -> int | None:
    """Smallest tile that covers ``size`` with ``count`` tiles overlapping by ``overlap``; None past one-pixel tiles."""
    if count == 1:
        return size
    tile = math.ceil((size + (count - 1) * overlap) / count)
    if tile <= 2 * overlap or tile >= size:
        return None
    return tile


def decode_within(weights: Weights, latents: torch.Tensor, cfg: VAEConfig, budget_bytes: float, *,
                  dtype: torch.dtype = torch.float32, out_device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """Decode untiled when the whole frame fits ``budget_bytes`` of working memory, else with the tiles that fit."""
    if latents.dim() == 4:
        latents = latents.unsqueeze(0)
    tiling = tiling_for_budget(cfg, latents.shape[3], latents.shape[4], budget_bytes, dtype=dtype)
    if tiling is None:
        return decode(weights, latents, cfg, dtype=dtype, out_device=out_device)
    return decode_tiled(weights, latents, cfg, tiling, dtype=dtype, out_device=out_device)


def encode_within(weights: Weights, video: torch.Tensor, cfg: VAEConfig, budget_bytes: float, *,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """Encode untiled when the whole frame fits ``budget_bytes``, else tiled (the decoder's estimate bounds it)."""
    if video.dim() == 4:
        video = video.unsqueeze(0)
    s = SPACE_FACTOR
    tiling = tiling_for_budget(cfg, video.shape[3] // s, video.shape[4] // s, budget_bytes, dtype=dtype)
    if tiling is None:
        return encode(weights, video, cfg, dtype=dtype)
    return encode_tiled(weights, video, cfg, tiling, dtype=dtype)
