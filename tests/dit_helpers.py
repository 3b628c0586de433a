"""Shared test helpers: tiny DiT weights from the arch spec, and quantized copies made by the converter's quantizer."""

from __future__ import annotations

import torch

from wanpack.convert.quantize import quantize_weight
from wanpack.convert.synth import random_tensor
from wanpack.manifests.arch import DiTConfig, dit_config, dit_tensors


def tiny_cfg(model_type: str = "t2v", layers: int = 2) -> DiTConfig:
    arch = "wan2.1-t2v-14b" if model_type == "t2v" else "wan2.1-i2v-14b"
    return dit_config(arch, layers=layers, dim_scale="tiny")


def make_weights(cfg: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every original-layout tensor with synth's seeded values; modulation tables get a visible magnitude."""
    return {s.name: random_tensor(s, seed, dtype) for s in dit_tensors(cfg)}


def quantized(weights: dict[str, torch.Tensor], cfg: DiTConfig, scheme: str) -> dict[str, torch.Tensor]:
    """The pack's view of the same weights: block Linears as int8/fp8 + ``_scale``, everything else unchanged."""
    out = dict(weights)
    for spec in dit_tensors(cfg):
        if spec.quantize:
            q, s = quantize_weight(weights[spec.name], scheme)
            out[spec.name] = q
            out[spec.name + "_scale"] = s
    return out
