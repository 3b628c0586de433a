"""The Wan2.1 DiT (runtime/models/dit.py) driven by the streaming engine: same phase code, weights from slots.

``streamed_forward`` mirrors the resident ``dit.forward`` step for step: the non-block prelude and head run on the
engine's resident weights, the blocks run phase by phase on whatever unit the engine yields (a whole block or one
phase). The modulation the self-attention phase returns is parked in a small state buffer for the FFN phase (which in
phase granularity comes from a different slot), and cross-attention K/V are cached per block as the resident runner
does. Everything the per-unit callback touches is an engine static in graph mode, so it captures and replays.
"""

from __future__ import annotations

import torch

from wanpack.errors import UsageError
from wanpack.manifests.arch import DiTConfig, config_from_dict
from wanpack.runtime.models import dit
from wanpack.runtime.models.rope import rope_tables
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.stream.bench import Workload
from wanpack.runtime.stream.engine import StreamEngine


def block_callback(cfg: DiTConfig, opts: dit.DiTOptions, kv_cache: dict, context_fn):
    """fn(unit, w, x, e0, cos, sin, mod) for StreamEngine.run; x [B, L, D] updated in place, mod [B, 6, D] state."""

    def fn(unit, w, x, e0, cos, sin, mod):
        for phase in unit.phases:
            if phase == "self_attn":
                mod.copy_(torch.cat(dit.self_attn_phase(w, x, e0, (cos, sin), cfg, opts), dim=1))
            elif phase == "cross_attn":
                if unit.block not in kv_cache:
                    kv_cache[unit.block] = dit.cross_kv(w, context_fn(), cfg, opts)
                dit.cross_attn_phase(w, x, kv_cache[unit.block], cfg, opts)
            elif phase == "ffn":
                dit.ffn_phase(w, x, mod.chunk(6, dim=1), cfg, opts)
        return x

    return fn


def graph_key(unit, slot: int) -> tuple:
    """Cross-attention reads per-block cached K/V, so units holding it get one graph per block."""
    return slot, unit.layout_key(), unit.block if "cross_attn" in unit.phases else None


def streamed_forward(engine: StreamEngine, cfg: DiTConfig, latents: torch.Tensor, t: torch.Tensor, text=None, *,
                     clip: torch.Tensor | None = None, y: torch.Tensor | None = None,
                     kv_cache: dict | None = None, opts: dit.DiTOptions | None = None,
                     residual_dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """Velocity prediction with blocks streamed by ``engine``; arguments and result as ``dit.forward`` (``kv_cache``
    also keeps the RoPE tables between steps, under "rope")."""
    opts = opts or dit.DiTOptions()
    kv_cache = {} if kv_cache is None else kv_cache
    nb = engine.resident
    if y is not None:
        latents = torch.cat([latents, y.to(latents.dtype)], dim=1)
    x, grid = dit.embed_patches(nb, latents, cfg, opts, residual_dtype)
    e, e0 = dit.time_embedding(nb, t, cfg, opts)
    if kv_cache.get("rope", (None,))[0] != grid:  # the same every step: computed once per sampling run
        kv_cache["rope"] = (grid, *rope_tables(grid, cfg.head_dim, dtype=opts.hi, device=x.device))
    _, cos, sin = kv_cache["rope"]
    ctx: list[torch.Tensor] = []

    def context_fn() -> torch.Tensor:
        if not ctx:
            if text is None:
                raise UsageError("no cached cross-attention K/V and no text given - pass the prompt embedding")
            ctx.append(dit.context(nb, text, cfg, opts, clip))
        return ctx[0]

    mod = torch.empty((e0.shape[0], 6, cfg.dim), dtype=opts.hi, device=x.device)
    fn = block_callback(cfg, opts, kv_cache, context_fn)
    x = engine.run(x, fn, e0, cos, sin, mod, graph_key=graph_key)
    return dit.unpatchify(dit.head(nb, x, e, cfg, opts), grid, cfg)


def dit_workload(pack: PackComponent, latent: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                 resident: dict, chunk: int) -> Workload:  # fmt: skip
    """The block loop of one DiT forward on a random latent, ready for StreamEngine.run (bench and tests)."""
    cfg = config_from_dict(pack.entry.config)
    opts = dit.DiTOptions(dtype=dtype, chunk_tokens=chunk)
    gen = torch.Generator().manual_seed(0)
    f, h, w = latent
    latents = torch.randn((1, cfg.in_dim, f, h, w), generator=gen).to(device)
    text = (torch.randn((1, cfg.text_len, cfg.text_dim), generator=gen) * 0.1).to(device)
    clip = (torch.randn((1, cfg.image_tokens, cfg.image_dim), generator=gen) * 0.1).to(device)
    x, grid = dit.embed_patches(resident, latents, cfg, opts)
    del x  # each forward embeds again (cheap), so no second full-length residual stays resident
    _, e0 = dit.time_embedding(resident, torch.tensor([500.0], device=device), cfg, opts)
    cos, sin = rope_tables(grid, cfg.head_dim, dtype=opts.hi, device=device)
    ctx = dit.context(resident, text, cfg, opts, clip if cfg.model_type == "i2v" else None)
    mod = torch.empty((1, 6, cfg.dim), dtype=opts.hi, device=device)
    fn = block_callback(cfg, opts, {}, lambda: ctx)
    return Workload(lambda: dit.embed_patches(resident, latents, cfg, opts)[0], fn, (e0, cos, sin, mod), graph_key)
