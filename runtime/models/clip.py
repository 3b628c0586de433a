"""The CLIP ViT-H/14 vision tower Wan uses for image-to-video, as functions of its weights.

Structure, like the T5: ``preprocess`` (image -> normalized 224x224 pixels), ``embed`` (patch conv, class token,
position embedding, pre-norm), then per block the phases ``attn`` and ``mlp`` (weights with ``visual.transformer.N.``
removed), then ``finish``. Wan feeds the DiT the hidden state after the first ``use_layers`` (31 of 32) blocks, with no
post-norm and no projection head, so those are never run: the result is [B, 257, 1280] for the real model.

Blocks are pre-norm: x += proj(attn(LN1(x))); x += mlp(LN2(x)), LayerNorm eps 1e-5 in fp32, one fused q/k/v
projection (rows ordered q, k, v; heads contiguous inside each), softmax scaled by 1/sqrt(head_dim), exact GELU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from wanpack.errors import UsageError
from wanpack.manifests.arch import CLIPConfig
from wanpack.runtime.models.weight_dict import apply_linear, block_view, need

Weights = Mapping[str, torch.Tensor]
PhaseFn = Callable[[Weights, torch.Tensor, None], torch.Tensor]

# OpenAI CLIP normalization, which the open-clip ViT-H/14 weights Wan uses were trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> float32 [B, 3, image_size, image_size], CLIP-normalized.

    As Wan does it: bicubic resize of the whole image (no crop, aspect not kept), then to [0, 1], then mean/std.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise UsageError(f"CLIP wants images shaped [batch, 3, height, width], got {tuple(images.shape)} - "
                         "pass RGB images with channels first")  # fmt: skip
    if not images.dtype.is_floating_point:
        raise UsageError(f"CLIP wants float images in [-1, 1], got {images.dtype} - convert with x / 127.5 - 1")
    x = F.interpolate(images.float(), size=(image_size, image_size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def layer_norm(x: torch.Tensor, weights: Weights, name: str, eps: float, part: str) -> torch.Tensor:
    """Affine LayerNorm computed in fp32, returned in x's dtype. [..., D] -> [..., D]."""
    w, b = need(weights, f"{name}.weight", part), need(weights, f"{name}.bias", part)
    return F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float(), eps).to(x.dtype)


class CLIPVision:
    """ViT vision tower over a weight dict; holds only the config and the compute dtype, never the weights."""

    def __init__(self, cfg: CLIPConfig, dtype: torch.dtype = torch.float16):
        self.cfg = cfg
        self.dtype = dtype
        self.head_dim = cfg.dim // cfg.num_heads

    @property
    def phases(self) -> tuple[str, ...]:
        """Phase names in execution order, as the manifest records them (the config owns them)."""
        return self.cfg.phases

    @property
    def num_blocks(self) -> int:
        """Blocks actually run: the first ``use_layers``; the last block's weights are never needed."""
        return self.cfg.use_layers

    @staticmethod
    def block_prefix(n: int) -> str:
        return f"visual.transformer.{n}."

    def phase(self, name: str) -> PhaseFn:
        """The callable for one phase of a block ('attn' or 'mlp')."""
        if name not in self.phases:
            raise UsageError(f"CLIP has no phase {name!r} - choose one of {', '.join(self.phases)}")
        return getattr(self, name)

    # ----------------------------------------------------------------------------------------------- non-block part

    def embed(self, weights: Weights, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Images [B, 3, H, W] in [-1, 1] -> tokens [B, 1 + (224/14)^2, dim] after pre_norm (full weight names)."""
        part, size, patch = "CLIP embedding", self.cfg.image_size, self.cfg.patch_size
        conv = need(weights, "visual.patch_embedding.weight", part)
        pixels = preprocess(images, size).to(device=conv.device, dtype=self.dtype)
        x = F.conv2d(pixels, conv.to(self.dtype), stride=patch).flatten(2).transpose(1, 2)  # [B, grid^2, dim]
        cls = need(weights, "visual.cls_embedding", part).to(self.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + need(weights, "visual.pos_embedding", part).to(self.dtype)
        return layer_norm(x, weights, "visual.pre_norm", self.cfg.eps, part), None

    def finish(self, weights: Weights, x: torch.Tensor, ctx: None = None) -> torch.Tensor:
        """The features the DiT consumes are the raw block output: no post_norm, no head. [B, S, dim]."""
        return x

    # ----------------------------------------------------------------------------------------------- block phases

    def attn(self, w: Weights, x: torch.Tensor, ctx: None = None) -> torch.Tensor:
        """x + proj(attention(norm1(x))). x [B, S, dim] -> [B, S, dim]."""
        b, s, d = x.shape
        part, heads = "CLIP attention", self.cfg.num_heads
        h = layer_norm(x, w, "norm1", self.cfg.eps, part)
        qkv = apply_linear(w, "attn.to_qkv", h, part, bias=True).view(b, s, 3, heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, head_dim]
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        return x + apply_linear(w, "attn.proj", out, part, bias=True)

    def mlp(self, w: Weights, x: torch.Tensor, ctx: None = None) -> torch.Tensor:
        """x + fc2(gelu(fc1(norm2(x)))), exact (erf) GELU. x [B, S, dim] -> [B, S, dim]."""
        part = "CLIP mlp"
        h = layer_norm(x, w, "norm2", self.cfg.eps, part)
        h = F.gelu(apply_linear(w, "mlp.0", h, part, bias=True))
        return x + apply_linear(w, "mlp.2", h, part, bias=True)

    def block(self, w: Weights, x: torch.Tensor, ctx: None = None) -> torch.Tensor:
        """Both phases of one block, for block-granularity streaming. x [B, S, dim] -> [B, S, dim]."""
        return self.mlp(w, self.attn(w, x))

    # ----------------------------------------------------------------------------------------------- resident runner

    def __call__(self, weights: Weights, images: torch.Tensor) -> torch.Tensor:
        """Encode with every weight resident (full names). Images [B, 3, H, W] in [-1, 1] -> [B, 257, dim]."""
        x, ctx = self.embed(weights, images)
        for n in range(self.num_blocks):
            x = self.block(block_view(weights, self.block_prefix(n)), x, ctx)
        return self.finish(weights, x, ctx)
