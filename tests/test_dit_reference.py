"""Our DiT against diffusers' WanTransformer3DModel (an independent implementation) on the SAME random weights.

Findings these tests pin down (fp32, tiny 2-block configs, 72 tokens; measured on CPU):
- Unmodified diffusers differs from ours by ~2e-6 relative (max abs ~8e-6 on outputs of magnitude ~4), T2V and I2V.
- With diffusers' two fp32 shortcuts replaced by the original's float64 math (the sinusoidal time embedding and the
  RoPE tables), the gap drops to ~2e-7, plain fp32 rounding. So the remaining difference is diffusers computing the
  time sinusoid in fp32 (angles t * freq near 1000 rad carry ~3e-5 rad of rounding); the original Wan computes it in
  float64, as we do (../shared/reference/wan21.md, "Time"). Ours follows the original.
- A float64 run does not tighten this: diffusers' blocks call ``.float()`` on the residual, so they stay fp32 inside.
"""

from __future__ import annotations

import math

import pytest
import torch
from dit_helpers import make_weights, tiny_cfg

from wanpack.runtime.models import dit

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

_NON_BLOCK = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",  # the affine LayerNorm before cross-attention is diffusers' norm2
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}  # fmt: skip


def diffusers_name(key: str) -> str:
    """Original Wan2.1 key -> diffusers WanTransformer3DModel key."""
    if key == "head.modulation":
        return "scale_shift_table"
    if key.startswith("blocks."):
        _, n, rest = key.split(".", 2)
        if rest == "modulation":
            return f"blocks.{n}.scale_shift_table"
        module, leaf = rest.rsplit(".", 1)
        return f"blocks.{n}.{_BLOCK[module]}.{leaf}"
    module, leaf = key.rsplit(".", 1)
    return f"{_NON_BLOCK[module]}.{leaf}"


def build_diffusers(cfg, weights, dtype):
    i2v = cfg.model_type == "i2v"
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, image_dim=cfg.image_dim if i2v else None, added_kv_proj_dim=cfg.dim if i2v else None,
    )  # fmt: skip
    state = {diffusers_name(k): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model.to(dtype).eval()


def original_math(model, cfg):
    """Swap diffusers' fp32 time sinusoid and fp32 RoPE tables for the original's float64 ones."""
    emb = model.condition_embedder

    def sinusoid(t):
        half = cfg.freq_dim // 2
        ang = t.double()[:, None] * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
        return torch.cat([ang.cos(), ang.sin()], dim=1)

    emb.timesteps_proj.forward = sinusoid
    cos, sin = [], []
    for d in (model.rope.t_dim, model.rope.h_dim, model.rope.w_dim):
        ang = torch.outer(torch.arange(1024, dtype=torch.float64), 1 / 10000 ** (torch.arange(0, d, 2).double() / d))
        cos.append(ang.cos().repeat_interleave(2, dim=1))
        sin.append(ang.sin().repeat_interleave(2, dim=1))
    model.rope.freqs_cos, model.rope.freqs_sin = torch.cat(cos, 1), torch.cat(sin, 1)


def inputs(cfg, seed=1):
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, 16, 3, 8, 12, generator=gen)  # grid (3, 4, 6) = 72 tokens
    text = torch.randn(1, 20, cfg.text_dim, generator=gen)  # 20 real tokens, padded to text_len inside
    clip = torch.randn(1, cfg.image_tokens, cfg.image_dim, generator=gen)
    y = torch.randn(1, cfg.in_dim - 16, 3, 8, 12, generator=gen) if cfg.model_type == "i2v" else None
    return lat, torch.tensor([937.0]), text, clip, y


def run_both(model_type, dtype, patch_original):
    cfg = tiny_cfg(model_type)
    weights = make_weights(cfg)
    lat, t, text, clip, y = inputs(cfg)
    model = build_diffusers(cfg, weights, dtype)
    if patch_original:
        original_math(model, cfg)
    padded = torch.cat([text, text.new_zeros(1, cfg.text_len - text.shape[1], cfg.text_dim)], dim=1)
    x_in = lat if y is None else torch.cat([lat, y], dim=1)
    with torch.no_grad():
        ref = model(x_in.to(dtype), t, padded.to(dtype), clip.to(dtype) if y is not None else None,
                    return_dict=False)[0]  # fmt: skip
        w = {k: v.to(dtype) for k, v in weights.items()}
        ours = dit.forward(w, cfg, lat.to(dtype), t, text.to(dtype), clip=clip.to(dtype), y=y,
                           opts=dit.DiTOptions(dtype=dtype, chunk_tokens=32))  # fmt: skip
    err = (ours.double() - ref.double()).abs().max().item()
    rel = err / ref.abs().max().item()
    print(f"{model_type} {dtype} original_math={patch_original}: max abs {err:.3g}, rel {rel:.3g}")
    return err, rel


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_matches_diffusers_fp32(model_type):
    _, rel = run_both(model_type, torch.float32, patch_original=False)
    # fp32 rounding (~1e-7 per op) plus diffusers' fp32 time sinusoid (up to ~3e-5 rad of angle error, damped by the
    # time MLP); measured ~2e-6. Any semantic difference (a wrong norm, RoPE split, modulation index) is >= 1e-2.
    assert rel < 2e-5


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_matches_diffusers_fp32_with_original_time_and_rope(model_type):
    """With the original's float64 sinusoid and RoPE swapped into diffusers, only fp32 rounding is left."""
    _, rel_stock = run_both(model_type, torch.float32, patch_original=False)
    _, rel_orig = run_both(model_type, torch.float32, patch_original=True)
    assert rel_orig < 1e-6  # measured ~2e-7
    assert rel_orig < rel_stock / 4


def test_sinusoid_is_cos_first_float64():
    t = torch.tensor([0.0, 999.0])
    s = dit.sinusoidal_embedding(t, 8)
    assert s.dtype == torch.float64
    assert torch.equal(s[0], torch.tensor([1.0] * 4 + [0.0] * 4, dtype=torch.float64))
    assert math.isclose(s[1, 1].item(), math.cos(999.0 * 10000 ** (-1 / 4)), rel_tol=1e-15)
