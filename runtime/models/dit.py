"""The Wan2.1 diffusion transformer as functions of its weights (original checkpoint names, views from a pack).

Pieces, in the order a forward uses them:
  embed_patches -> time_embedding -> text/image context -> cross_kv (once per prompt, cached)
  -> per block: self_attn_phase (returns the 6 modulation chunks) -> cross_attn_phase -> ffn_phase
  -> head -> unpatchify.
Block phases take block-relative weight dicts (``self_attn.q.weight``, ...), update the residual ``x`` in place and
never move weights, so the resident runner here and the streaming engine call exactly the same code.

Precision: linears and attention run in ``opts.dtype`` (bf16 on GPU). Norms, modulation, RoPE, the time embedding,
the head and the residual stream run in ``hi`` = the wider of fp32 and ``opts.dtype`` (the original keeps the residual
fp32 too). Memory: every per-token step walks the sequence in chunks of ``opts.chunk_tokens``; the only full-length
activations are the residual and the self-attention K and V.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wanpack.errors import UsageError
from wanpack.manifests.arch import DiTConfig
from wanpack.runtime.models.rope import rope_tables
from wanpack.runtime.models.weight_dict import apply_linear, apply_linear_add_, block_view, need
from wanpack.runtime.ops.activations import gelu_quantized
from wanpack.runtime.ops.attention import attention
from wanpack.runtime.ops.linear import QMAX, Activation, QuantizedActivation, gemm_backend, reads_quantized_only
from wanpack.runtime.ops.norms import layer_norm, layer_norm_quantized, rms_norm_rope

Weights = Mapping[str, torch.Tensor]
DEFAULT_CHUNK_BUDGET = 768 * 2**20  # bytes of per-chunk temporaries; keeps 720p (75600 tokens) under 4 GiB


@dataclass(frozen=True)
class DiTOptions:
    """How to run (not what): compute dtype and the sequence chunk length for per-token work."""

    dtype: torch.dtype = torch.bfloat16
    chunk_tokens: int = 4096

    @property
    def hi(self) -> torch.dtype:
        return torch.promote_types(self.dtype, torch.float32)

    @classmethod
    def for_budget(cls, cfg: DiTConfig, budget_bytes: int = DEFAULT_CHUNK_BUDGET, dtype: torch.dtype = torch.bfloat16,
                   batch: int = 1) -> DiTOptions:  # fmt: skip
        """Options whose per-chunk temporaries fit ``budget_bytes`` (see :func:`chunk_tokens_for`)."""
        return cls(dtype=dtype, chunk_tokens=chunk_tokens_for(cfg, budget_bytes, dtype, batch))


@dataclass
class CrossKV:
    """One block's cross-attention keys/values for a batch of prompts, [B, Lctx, H, hd] each (image ones: i2v)."""

    k: torch.Tensor
    v: torch.Tensor
    k_img: torch.Tensor | None = None
    v_img: torch.Tensor | None = None


Modulation = tuple[torch.Tensor, ...]  # (shift, scale, gate) x (self-attn, ffn), each [B, 1, D] in hi

# ----------------------------------------------------------------------------------------------------- helpers


def _lin(w: Weights, name: str, x: Activation) -> torch.Tensor:
    return apply_linear(w, name, x, "dit", bias=True)  # every Wan DiT Linear has a bias


def _lin_add(w: Weights, name: str, x: Activation, out: torch.Tensor, gate: torch.Tensor | None = None) -> None:
    """out += Linear ``name``(x) (* gate): a residual add, fused into the GEMM where the backend can."""
    apply_linear_add_(w, name, x, out, "dit", gate, bias=True)


def token_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices over n tokens, as few as chunks of at most ``size`` allow, all of one length (the last may be shorter
    by the remainder): 32760 tokens by 8192 are four chunks of 8190, not three of 8192 and one of 8184. Equal chunks
    mean one attention shape per kind and per resolution, so cuDNN plans each once instead of twice."""
    if n <= 0:
        return
    count = -(-n // max(1, size))
    step = -(-n // count)
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                    opts: DiTOptions) -> torch.Tensor:  # fmt: skip
    """LN(x) * (1 + scale) + shift in hi (LayerNorm without affine), returned in the compute dtype."""
    return layer_norm(x, eps, opts.dtype, opts.hi, shift=shift, scale=scale)


def _input_quant_dtype(w: Weights, names: tuple[str, ...], device: torch.device) -> torch.dtype | None:
    """The dtype the linears ``names`` quantize their shared input to, or None when none would (float weights, mixed
    kinds, or the weight-only ``dequant`` backend, which reads the activation as it is)."""
    weights = [w.get(f"{n}.weight") for n in names]
    dtypes = {None if t is None else t.dtype for t in weights}
    if len(dtypes) != 1 or (dtype := dtypes.pop()) not in QMAX:
        return None
    return None if gemm_backend(dtype, device).name == "dequant" else dtype


def _quantized_only(w: Weights, names: tuple[str, ...], qdtype: torch.dtype | None, device: torch.device,
                    rows: int) -> bool:  # fmt: skip
    """Whether the linears ``names`` read nothing but the ``qdtype`` copy of their shared input of ``rows`` tokens."""
    return qdtype is not None and all(reads_quantized_only(w[f"{n}.weight"].dtype, device, rows) for n in names)


def _norm_for(w: Weights, names: tuple[str, ...], x: torch.Tensor, eps: float, opts: DiTOptions,
              **norm: torch.Tensor) -> QuantizedActivation:  # fmt: skip
    """The LayerNorm (modulated: shift/scale; affine: weight/bias) as the shared input of the linears ``names``,
    quantized at most once for all of them; with W8A8 weights on CUDA the norm kernel writes the quantized copy
    itself (no separate quantizer pass), and only that copy when nothing reads the 16-bit one."""
    qdtype = _input_quant_dtype(w, names, x.device)
    rows = x.shape[0] * x.shape[1]
    keep = not _quantized_only(w, names, qdtype, x.device, rows)
    return layer_norm_quantized(x, eps, opts.dtype, opts.hi, qdtype, keep_plain=keep, **norm)


def _modulated_norm_for(w: Weights, names: tuple[str, ...], x: torch.Tensor, shift: torch.Tensor,
                        scale: torch.Tensor, eps: float, opts: DiTOptions) -> QuantizedActivation:  # fmt: skip
    """:func:`_modulated_norm` as the shared input of the linears ``names`` (see :func:`_norm_for`)."""
    return _norm_for(w, names, x, eps, opts, shift=shift, scale=scale)


def _gelu_for(w: Weights, names: tuple[str, ...], h: torch.Tensor) -> QuantizedActivation:
    """GELU (tanh) of h as the input of the linears ``names``: with W8A8 weights on CUDA one kernel writes the
    quantized copy they read (and the GELU itself only if something else reads it), as :func:`_norm_for` does."""
    qdtype = _input_quant_dtype(w, names, h.device)
    keep = not _quantized_only(w, names, qdtype, h.device, h.shape[0] * h.shape[1])
    return gelu_quantized(h, qdtype, keep_plain=keep)


def _qk_norm(y: torch.Tensor, weight: torch.Tensor, cfg: DiTConfig, opts: DiTOptions,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """RMS norm over the full width (across heads) in hi, times its gain, RoPE'd when given -> [B, L, H, hd]."""
    cos, sin = rope if rope is not None else (None, None)
    out = rms_norm_rope(y, weight, cfg.eps, opts.dtype, opts.hi, cfg.head_dim, cos, sin)
    return out.unflatten(-1, (cfg.num_heads, cfg.head_dim))


def block_weights(weights: Weights, index: int) -> dict[str, torch.Tensor]:
    """The block-relative view of a full weight dict (``blocks.N.`` stripped), as the streamer hands blocks over."""
    return block_view(weights, f"blocks.{index}.")


# ----------------------------------------------------------------------------------------------------- embeddings


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """cat([cos, sin]) of t * 10000^(-k/half), k < half, in float64 (cos first). t [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def time_embedding(nb: Weights, t: torch.Tensor, cfg: DiTConfig, opts: DiTOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps t [B] -> (e [B, D] for the head, e0 [B, 6, D] for the blocks), both in hi."""
    s = sinusoidal_embedding(t, cfg.freq_dim).to(opts.hi)
    e = _lin(nb, "time_embedding.2", F.silu(_lin(nb, "time_embedding.0", s)))
    e0 = _lin(nb, "time_projection.1", F.silu(e)).unflatten(1, (6, cfg.dim))
    return e, e0


def text_context(nb: Weights, text: torch.Tensor | list[torch.Tensor], cfg: DiTConfig,
                 opts: DiTOptions) -> torch.Tensor:  # fmt: skip
    """T5 output (per prompt [Li, text_dim], Li <= text_len) -> [B, text_len, D].

    Each prompt is zero-padded to text_len BEFORE the projection and the padding rows are attended later (no mask),
    exactly as the original does: they carry text_embedding(0), not zeros.
    """
    rows = list(text) if isinstance(text, list) else list(text.unbind(0))
    padded = rows[0].new_zeros((len(rows), cfg.text_len, cfg.text_dim), dtype=opts.dtype)
    for i, r in enumerate(rows):
        if r.shape[0] > cfg.text_len:
            raise UsageError(f"prompt {i} has {r.shape[0]} text tokens, more than text_len {cfg.text_len} - trim it")
        padded[i, : r.shape[0]] = r.to(opts.dtype)
    h = F.gelu(_lin(nb, "text_embedding.0", padded), approximate="tanh")
    return _lin(nb, "text_embedding.2", h)


def image_context(nb: Weights, clip: torch.Tensor, opts: DiTOptions) -> torch.Tensor:
    """I2V: CLIP tokens [B, 257, image_dim] -> [B, 257, D] (LN -> Linear -> exact GELU -> Linear -> LN)."""
    x = clip.to(opts.hi)
    x = F.layer_norm(x, x.shape[-1:], nb["img_emb.proj.0.weight"].to(opts.hi), nb["img_emb.proj.0.bias"].to(opts.hi))
    x = _lin(nb, "img_emb.proj.3", F.gelu(_lin(nb, "img_emb.proj.1", x.to(opts.dtype))))
    x = x.to(opts.hi)
    x = F.layer_norm(x, x.shape[-1:], nb["img_emb.proj.4.weight"].to(opts.hi), nb["img_emb.proj.4.bias"].to(opts.hi))
    return x.to(opts.dtype)


def context(nb: Weights, text, cfg: DiTConfig, opts: DiTOptions, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-attention context: text tokens, with the CLIP image tokens in front for i2v. -> [B, (257+)512, D]."""
    txt = text_context(nb, text, cfg, opts)
    if cfg.model_type != "i2v":
        return txt
    if clip is None:
        raise UsageError("an i2v model needs CLIP image features - pass the conditioning image")
    return torch.cat([image_context(nb, clip, opts), txt], dim=1)


def embed_patches(nb: Weights, latents: torch.Tensor, cfg: DiTConfig, opts: DiTOptions,
                  residual_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:  # fmt: skip
    """Conv3d patch embedding, one frame group at a time. latents [B, in_dim, F, H, W] -> (x [B, L, D], grid).

    For i2v the caller passes cat([noise(16), y(20)]) on channels. The residual is written in ``residual_dtype``
    (default hi).
    """
    b, _, f, h, w = latents.shape
    pt, ph, pw = cfg.patch_size
    grid = (f // pt, h // ph, w // pw)
    per_group = grid[1] * grid[2]
    x = torch.empty((b, math.prod(grid), cfg.dim), dtype=residual_dtype or opts.hi, device=latents.device)
    weight = nb["patch_embedding.weight"].to(opts.dtype)
    bias = nb["patch_embedding.bias"].to(opts.dtype)
    for g in range(grid[0]):
        out = F.conv3d(latents[:, :, g * pt : (g + 1) * pt].to(opts.dtype), weight, bias, stride=cfg.patch_size)
        x[:, g * per_group : (g + 1) * per_group] = out.flatten(2).transpose(1, 2)
    return x, grid


# ----------------------------------------------------------------------------------------------------- block phases


def self_attn_phase(w: Weights, x: torch.Tensor, e0: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                    cfg: DiTConfig, opts: DiTOptions) -> Modulation:  # fmt: skip
    """x += self_attn(LN(x) * (1 + scale) + shift) * gate, in place. x [B, L, D], e0 [B, 6, D], rope ([L, hd/2],)*2.

    Returns the block's 6 modulation chunks; the FFN phase takes the last three. K and V are built for the whole
    sequence first (they are all that every query needs), then the queries run chunk by chunk straight into x.
    """
    mod = (need(w, "modulation", "dit block").to(opts.hi) + e0.to(opts.hi)).chunk(6, dim=1)
    shift, scale, gate = mod[0], mod[1], mod[2]
    b, n, d = x.shape
    heads, hd = cfg.num_heads, cfg.head_dim
    cos, sin = rope
    k = torch.empty((b, n, heads, hd), dtype=opts.dtype, device=x.device)
    v = torch.empty_like(k)
    for s in token_chunks(n, opts.chunk_tokens):
        xn = _modulated_norm_for(w, ("self_attn.k", "self_attn.v"), x[:, s], shift, scale, cfg.eps, opts)
        k[:, s] = _qk_norm(_lin(w, "self_attn.k", xn), w["self_attn.norm_k.weight"], cfg, opts, (cos[s], sin[s]))
        v[:, s] = _lin(w, "self_attn.v", xn).unflatten(-1, (heads, hd))
    prepared = {}  # K/V as a quantizing attention backend preprocesses them: once for all query chunks
    for s in token_chunks(n, opts.chunk_tokens):
        xn = _modulated_norm_for(w, ("self_attn.q",), x[:, s], shift, scale, cfg.eps, opts)
        q = _qk_norm(_lin(w, "self_attn.q", xn), w["self_attn.norm_q.weight"], cfg, opts, (cos[s], sin[s]))
        o = attention(q, k, v, prepared).flatten(2)
        _lin_add(w, "self_attn.o", o, x[:, s], gate)
    return mod


def cross_kv(w: Weights, ctx: torch.Tensor, cfg: DiTConfig, opts: DiTOptions) -> CrossKV:
    """K/V of one block's cross-attention for a context [B, (257+)512, D]; constant through sampling, so cached."""
    img, txt = (ctx[:, : cfg.image_tokens], ctx[:, cfg.image_tokens :]) if cfg.model_type == "i2v" else (None, ctx)

    def kv(kname: str, vname: str, norm: str, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src = QuantizedActivation(src)  # k and v share one quantization of the context
        k = _qk_norm(_lin(w, kname, src), w[norm], cfg, opts)
        return k, _lin(w, vname, src).unflatten(-1, (cfg.num_heads, cfg.head_dim))

    k, v = kv("cross_attn.k", "cross_attn.v", "cross_attn.norm_k.weight", txt)
    if img is None:
        return CrossKV(k, v)
    k_img, v_img = kv("cross_attn.k_img", "cross_attn.v_img", "cross_attn.norm_k_img.weight", img)
    return CrossKV(k, v, k_img, v_img)


def cross_attn_phase(w: Weights, x: torch.Tensor, kv: CrossKV, cfg: DiTConfig, opts: DiTOptions) -> None:
    """x += cross_attn(norm3(x), context), in place (no modulation, no gate). x [B, L, D]; kv from :func:`cross_kv`.

    i2v: one query attends the text and the image keys separately; the two outputs are summed before ``o``.
    """
    for s in token_chunks(x.shape[1], opts.chunk_tokens):
        xn = _norm_for(w, ("cross_attn.q",), x[:, s], cfg.eps, opts, weight=w["norm3.weight"], bias=w["norm3.bias"])
        q = _qk_norm(_lin(w, "cross_attn.q", xn), w["cross_attn.norm_q.weight"], cfg, opts)
        o = attention(q, kv.k, kv.v)
        if kv.k_img is not None:
            o = o + attention(q, kv.k_img, kv.v_img)
        _lin_add(w, "cross_attn.o", o.flatten(2), x[:, s])


def ffn_phase(w: Weights, x: torch.Tensor, mod: Modulation, cfg: DiTConfig, opts: DiTOptions) -> None:
    """x += ffn(LN(x) * (1 + scale) + shift) * gate, in place, chunked; ffn = Linear -> GELU(tanh) -> Linear."""
    shift, scale, gate = mod[3], mod[4], mod[5]
    for s in token_chunks(x.shape[1], opts.chunk_tokens):
        xn = _modulated_norm_for(w, ("ffn.0",), x[:, s], shift, scale, cfg.eps, opts)
        h = _lin(w, "ffn.0", xn)
        del xn
        _lin_add(w, "ffn.2", _gelu_for(w, ("ffn.2",), h), x[:, s], gate)


def block_forward(w: Weights, x: torch.Tensor, e0: torch.Tensor, rope, kv: CrossKV, cfg: DiTConfig,
                  opts: DiTOptions) -> torch.Tensor:  # fmt: skip
    """One whole block, phases in order (the streaming engine calls them one by one instead)."""
    mod = self_attn_phase(w, x, e0, rope, cfg, opts)
    cross_attn_phase(w, x, kv, cfg, opts)
    ffn_phase(w, x, mod, cfg, opts)
    return x


# ----------------------------------------------------------------------------------------------------- output


def head(nb: Weights, x: torch.Tensor, e: torch.Tensor, cfg: DiTConfig, opts: DiTOptions) -> torch.Tensor:
    """Modulated LN (from e, not e0) + Linear in hi. x [B, L, D], e [B, D] -> [B, L, out_dim * prod(patch)]."""
    shift, scale = (nb["head.modulation"].to(opts.hi) + e[:, None].to(opts.hi)).chunk(2, dim=1)
    hi_opts = DiTOptions(dtype=opts.hi, chunk_tokens=opts.chunk_tokens)
    out = torch.empty((*x.shape[:2], nb["head.head.weight"].shape[0]), dtype=opts.hi, device=x.device)
    for s in token_chunks(x.shape[1], opts.chunk_tokens):
        out[:, s] = _lin(nb, "head.head", _modulated_norm(x[:, s], shift, scale, cfg.eps, hi_opts))
    return out


def unpatchify(out: torch.Tensor, grid: tuple[int, int, int], cfg: DiTConfig) -> torch.Tensor:
    """[B, L, pt*ph*pw*C] (features ordered pt, ph, pw, C) -> [B, C, F*pt, H*ph, W*pw]."""
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    x = out.reshape(out.shape[0], f, h, w, pt, ph, pw, cfg.out_dim)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(out.shape[0], cfg.out_dim, f * pt, h * ph, w * pw)


# ----------------------------------------------------------------------------------------------------- resident runner


def forward(weights: Weights, cfg: DiTConfig, latents: torch.Tensor, t: torch.Tensor, text=None, *,
            clip: torch.Tensor | None = None, y: torch.Tensor | None = None, kv_cache: dict[int, CrossKV] | None = None,
            opts: DiTOptions | None = None, residual_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """Velocity prediction with every weight resident in ``weights`` (full original names).

    latents [B, 16, F, H, W]; t [B]; text: T5 output [B, Li, text_dim] or a list of [Li, text_dim]; i2v adds
    clip [B, 257, image_dim] and y [B, 20, F, H, W]. ``kv_cache`` (one dict per prompt batch) holds each block's
    cross-attention K/V: filled on the first call, reused afterwards (text/clip may then be None).
    Returns [B, 16, F, H, W] in hi.
    """
    opts = opts or DiTOptions()
    kv_cache = {} if kv_cache is None else kv_cache
    if y is not None:
        latents = torch.cat([latents, y.to(latents.dtype)], dim=1)
    x, grid = embed_patches(weights, latents, cfg, opts, residual_dtype)
    e, e0 = time_embedding(weights, t, cfg, opts)
    rope = rope_tables(grid, cfg.head_dim, dtype=opts.hi, device=x.device)
    ctx = None
    for n in range(cfg.num_layers):
        w = block_weights(weights, n)
        if n not in kv_cache:
            if ctx is None:
                if text is None:
                    raise UsageError("no cached cross-attention K/V and no text given - pass the prompt embedding")
                ctx = context(weights, text, cfg, opts, clip)
            kv_cache[n] = cross_kv(w, ctx, cfg, opts)
        block_forward(w, x, e0, rope, kv_cache[n], cfg, opts)
    return unpatchify(head(weights, x, e, cfg, opts), grid, cfg)


# ----------------------------------------------------------------------------------------------------- memory


def token_bytes(cfg: DiTConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Upper estimate of per-token temporaries inside one chunk (the larger of self-attention and FFN)."""
    c = torch.empty((), dtype=dtype).element_size()
    f = max(4, c)
    self_attn = (6 * f + 4 * c) * cfg.dim  # LN, modulated input, projection, RMS + RoPE in hi, output, residual term
    ffn = (3 * f + 2 * c) * cfg.dim + 2 * c * cfg.ffn_dim  # hidden before and after GELU
    return max(self_attn, ffn)


def chunk_tokens_for(cfg: DiTConfig, budget_bytes: int = DEFAULT_CHUNK_BUDGET, dtype: torch.dtype = torch.bfloat16,
                     batch: int = 1) -> int:  # fmt: skip
    """Chunk length (a multiple of 256, at least 256) whose temporaries fit ``budget_bytes``."""
    tokens = budget_bytes // (token_bytes(cfg, dtype) * batch)
    return max(256, tokens // 256 * 256)


def latent_shape(height: int, width: int, frames: int) -> tuple[int, int, int]:
    """Latent (F, H, W) of a video: 4x temporal (first frame alone), 8x spatial VAE compression."""
    return (frames - 1) // 4 + 1, height // 8, width // 8


def activation_memory(cfg: DiTConfig, latent_shape: tuple[int, int, int], *, batch: int = 1,
                      opts: DiTOptions | None = None, residual_dtype: torch.dtype | None = None,
                      quantized_attention: bool = False) -> dict[str, int]:  # fmt: skip
    """Estimated peak activation bytes of one block at a latent size (F, H, W), chunking included.

    Parts: the residual, self-attention K and V (full length), RoPE tables, one chunk's temporaries, cross K/V, and
    with ``quantized_attention`` the sage kernel's int8 K and fp8 V copies (one byte per element each).
    """
    opts = opts or DiTOptions()
    f, h, w = latent_shape
    pt, ph, pw = cfg.patch_size
    n = (f // pt) * (h // ph) * (w // pw)
    c = torch.empty((), dtype=opts.dtype).element_size()
    hi = torch.empty((), dtype=residual_dtype or opts.hi).element_size()
    ctx = cfg.text_len + (cfg.image_tokens if cfg.model_type == "i2v" else 0)
    parts = {
        "tokens": n,
        "residual": batch * n * cfg.dim * hi,
        "self_attn_kv": 2 * batch * n * cfg.dim * c,
        "rope": 2 * n * (cfg.head_dim // 2) * torch.empty((), dtype=opts.hi).element_size(),
        "chunk": batch * min(n, opts.chunk_tokens) * token_bytes(cfg, opts.dtype),
        "cross_kv": 2 * batch * ctx * cfg.dim * c,
        "quantized_kv": 2 * batch * n * cfg.dim if quantized_attention else 0,
    }
    parts["peak"] = sum(v for k, v in parts.items() if k != "tokens")
    return parts
