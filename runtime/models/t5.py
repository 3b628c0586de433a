"""The umt5-xxl encoder (Wan's text encoder) as functions of its weights, split so its blocks can be streamed.

Structure: ``embed`` (token embedding + the per-batch constants) -> for each block the phases ``attn`` then ``ffn``
(each takes the block's weights with ``blocks.N.`` removed) -> ``finish`` (final RMS norm, trim each prompt to its
real token count). ``T5Encoder.__call__`` runs all of it over a resident weight dict; the streaming engine calls the
same pieces with streamed block weights.

Math (umt5, as Wan uses it): RMS norm without mean or bias (eps 1e-6, fp32); attention logits are NOT scaled by
1/sqrt(head_dim) because T5 folds that into its weights; every layer has its own relative-position bias over 32
bidirectional buckets (max distance 128); padded keys are masked; the FFN is gated, fc2(fc1(x) * gelu_tanh(gate(x))).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wanpack.errors import UsageError
from wanpack.manifests.arch import T5Config
from wanpack.runtime.models.weight_dict import apply_linear, block_view, need

Weights = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class T5Context:
    """Per-batch constants shared by every block: which keys are padding, and each query/key pair's bucket."""

    key_padding: torch.Tensor  # [B, 1, 1, L] bool, True where the key is a padding token
    buckets: torch.Tensor  # [L, L] int64 relative-position bucket of (query i, key j)
    lengths: tuple[int, ...]  # real (unpadded) token count of each prompt


PhaseFn = Callable[[Weights, torch.Tensor, T5Context], torch.Tensor]


def relative_buckets(length: int, num_buckets: int, max_dist: int, device: torch.device | None = None) -> torch.Tensor:
    """Bucket of every (query, key) offset for bidirectional T5 attention -> [length, length] int64.

    Half the buckets hold keys after the query, half before; within each half, offsets below half of that half get
    their own bucket and larger ones share log-spaced buckets up to ``max_dist``.
    """
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # key minus query
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    exact = half // 2
    log_part = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_dist / exact) * (half - exact)
    far = (exact + log_part.long()).clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5 layer norm: scale by the root mean square only (no mean, no bias), in fp32. [..., D] -> [..., D]."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def _fp16_guard(x: torch.Tensor) -> torch.Tensor:
    """fp16 activations overflow in umt5's residual stream; keep them finite (bf16 and fp32 need nothing)."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max - 1000
    return x.clamp(-limit, limit)


class T5Encoder:
    """umt5 encoder over a weight dict; holds only the config and the compute dtype, never the weights."""

    def __init__(self, cfg: T5Config, dtype: torch.dtype = torch.bfloat16):
        self.cfg = cfg
        self.dtype = dtype
        self.head_dim = cfg.dim_attn // cfg.num_heads

    @property
    def phases(self) -> tuple[str, ...]:
        """Phase names in execution order, as the manifest records them (the config owns them)."""
        return self.cfg.phases

    @property
    def num_blocks(self) -> int:
        return self.cfg.num_layers

    @staticmethod
    def block_prefix(n: int) -> str:
        return f"blocks.{n}."

    def phase(self, name: str) -> PhaseFn:
        """The callable for one phase of a block ('attn' or 'ffn')."""
        if name not in self.phases:
            raise UsageError(f"T5 has no phase {name!r} - choose one of {', '.join(self.phases)}")
        return getattr(self, name)

    # ----------------------------------------------------------------------------------------------- non-block part

    def embed(self, weights: Weights, ids: torch.Tensor, mask: torch.Tensor,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, T5Context]:  # fmt: skip
        """Token ids [B, L] and mask [B, L] (1 = real token, 0 = padding, padding at the end) -> x [B, L, dim].

        ``weights`` holds ``token_embedding.weight`` (full names). The lookup runs where that table lives; x and the
        context (which goes to every block) are then put on ``device`` (default: the table's). The real table is
        2 GiB, so on a small GPU it can stay in host RAM and only the looked-up rows cross the bus.
        """
        lengths = _check_tokens(ids, mask, self.cfg.vocab)
        table = need(weights, "token_embedding.weight", "T5 embedding")
        device = torch.device(device) if device is not None else table.device
        x = F.embedding(ids.to(device=table.device, dtype=torch.long), table).to(device=device, dtype=self.dtype)
        key_padding = (mask.to(device) == 0)[:, None, None, :]
        buckets = relative_buckets(ids.shape[1], self.cfg.num_buckets, self.cfg.max_dist, device)
        return x, T5Context(key_padding=key_padding, buckets=buckets, lengths=lengths)

    def finish(self, weights: Weights, x: torch.Tensor, ctx: T5Context) -> list[torch.Tensor]:
        """Final RMS norm, then each prompt cut to its real tokens: x [B, L, dim] -> B tensors [len_i, dim]."""
        x = rms_norm(x, need(weights, "norm.weight", "T5 final norm"), self.cfg.eps)
        return [x[i, :n] for i, n in enumerate(ctx.lengths)]

    # ----------------------------------------------------------------------------------------------- block phases

    def attn(self, w: Weights, x: torch.Tensor, ctx: T5Context) -> torch.Tensor:
        """x + self-attention(norm1(x)) with this layer's relative-position bias. x [B, L, dim] -> [B, L, dim]."""
        b, n, _ = x.shape
        heads, part = self.cfg.num_heads, "T5 attention"
        h = rms_norm(x, need(w, "norm1.weight", part), self.cfg.eps)
        q, k, v = (apply_linear(w, f"attn.{p}", h, part).view(b, n, heads, self.head_dim).transpose(1, 2)
                   for p in "qkv")  # fmt: skip
        table = need(w, "pos_embedding.embedding.weight", part)  # [buckets, heads]
        bias = F.embedding(ctx.buckets, table).permute(2, 0, 1)[None].to(self.dtype)  # [1, H, L, L]
        bias = bias.masked_fill(ctx.key_padding, torch.finfo(self.dtype).min)  # [B, H, L, L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        out = out.transpose(1, 2).reshape(b, n, self.cfg.dim_attn)
        return _fp16_guard(x + apply_linear(w, "attn.o", out, part))

    def ffn(self, w: Weights, x: torch.Tensor, ctx: T5Context) -> torch.Tensor:
        """x + fc2(fc1(h) * gelu_tanh(gate(h))), h = norm2(x). x [B, L, dim] -> [B, L, dim]."""
        part = "T5 feed-forward"
        h = rms_norm(x, need(w, "norm2.weight", part), self.cfg.eps)
        gate = F.gelu(apply_linear(w, "ffn.gate.0", h, part), approximate="tanh")
        hidden = apply_linear(w, "ffn.fc1", h, part) * gate
        return _fp16_guard(x + apply_linear(w, "ffn.fc2", hidden, part))

    def block(self, w: Weights, x: torch.Tensor, ctx: T5Context) -> torch.Tensor:
        """Both phases of one block, for block-granularity streaming. x [B, L, dim] -> [B, L, dim]."""
        return self.ffn(w, self.attn(w, x, ctx), ctx)

    # ----------------------------------------------------------------------------------------------- resident runner

    def __call__(self, weights: Weights, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Encode with every weight resident (full checkpoint names). ids, mask [B, L] -> B tensors [len_i, dim].

        Activations follow the first block's weights, so the embedding table may live on another device.
        """
        device = need(weights, "blocks.0.attn.q.weight", "T5 attention").device
        x, ctx = self.embed(weights, ids, mask, device=device)
        for n in range(self.num_blocks):
            x = self.block(block_view(weights, self.block_prefix(n)), x, ctx)
        return self.finish(weights, x, ctx)


def _check_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> tuple[int, ...]:
    """Validate a token batch and return each prompt's real length (the mask must be ones, then zeros)."""
    if ids.dim() != 2 or ids.shape != mask.shape:
        raise UsageError(f"T5 wants ids and mask of the same shape [batch, tokens], got {tuple(ids.shape)} and "
                         f"{tuple(mask.shape)} - pass the tokenizer's output unchanged")  # fmt: skip
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise UsageError(f"T5 token ids must be integers, got {ids.dtype} - pass the tokenizer's ids")
    if ids.numel() == 0:
        raise UsageError("T5 got an empty token batch - give at least one prompt")
    ids_cpu, mask_cpu = ids.detach().cpu(), mask.detach().cpu().long()
    lo, hi = int(ids_cpu.min()), int(ids_cpu.max())
    if lo < 0 or hi >= vocab:
        raise UsageError(f"token id {hi if hi >= vocab else lo} is outside the T5 vocabulary of {vocab} - "
                         "use the tokenizer that came with this pack")  # fmt: skip
    lengths = mask_cpu.sum(1)
    expected = (torch.arange(mask.shape[1])[None, :] < lengths[:, None]).long()
    if not torch.equal(mask_cpu, expected):
        raise UsageError("T5 mask must be 1 for real tokens then 0 for padding (right padding) - "
                         "pass the tokenizer's mask unchanged")  # fmt: skip
    if int(lengths.min()) == 0:
        raise UsageError("a T5 prompt has no tokens (its mask is all zeros) - tokenize with the end-of-text token")
    return tuple(int(n) for n in lengths)
