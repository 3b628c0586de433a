"""Test helper: the original Wan2.1_VAE.pth key names mapped to diffusers' AutoencoderKLWan names (tests only)."""

from __future__ import annotations

import re

import torch

from wanpack.manifests.arch import VAEConfig

_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2",
             "shortcut": "conv_shortcut"}  # fmt: skip
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}


def _rest(rest: str) -> str:
    for old, new in _RESIDUAL.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def diffusers_name(name: str, cfg: VAEConfig) -> str:
    """Original key -> AutoencoderKLWan state_dict key."""
    top = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
    for old, new in top.items():
        if name.startswith(old):
            return new + name[len(old) :]
    side, rest = name.split(".", 1)
    if rest.startswith("conv1."):
        return f"{side}.conv_in.{rest[len('conv1.'):]}"
    if rest.startswith("head.0."):
        return f"{side}.norm_out.{rest[len('head.0.'):]}"
    if rest.startswith("head.2."):
        return f"{side}.conv_out.{rest[len('head.2.'):]}"
    m = re.match(r"middle\.(\d)\.(.*)", rest)
    if m:
        return f"{side}.mid_block.{_MIDDLE[m.group(1)]}.{_rest(m.group(2))}"
    m = re.match(r"downsamples\.(\d+)\.(.*)", rest)
    if m:
        return f"encoder.down_blocks.{m.group(1)}.{_rest(m.group(2))}"
    m = re.match(r"upsamples\.(\d+)\.(.*)", rest)
    if m:
        group = cfg.num_res_blocks + 2  # res blocks + one upsampler per level
        level, j = divmod(int(m.group(1)), group)
        inner = f"resnets.{j}" if j <= cfg.num_res_blocks else "upsamplers.0"
        return f"decoder.up_blocks.{level}.{inner}.{_rest(m.group(2))}"
    raise KeyError(name)


def diffusers_vae(state: dict[str, torch.Tensor], cfg: VAEConfig):
    """AutoencoderKLWan with the same config and weights, in eval mode (strict load: key sets must agree)."""
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                             num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temporal_downsample),
                             latents_mean=list(cfg.latents_mean), latents_std=list(cfg.latents_std))  # fmt: skip
    model.load_state_dict({diffusers_name(k, cfg): v.float() for k, v in state.items()}, strict=True)
    return model.eval()
