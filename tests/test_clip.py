"""CLIP vision tower: against transformers' CLIPVisionModel on the same tiny random weights, preprocessing, streamed
phases, quantized blocks and bad inputs."""

from __future__ import annotations

import pytest
import torch

from wanpack.convert.quantize import quantize_weight
from wanpack.convert.synth import HUB_FILES, random_tensor, synth_checkpoint
from wanpack.errors import PackFormatError, UsageError
from wanpack.manifests.arch import CLIPConfig, clip_tensors, encoder_config
from wanpack.runtime.models.clip import CLIP_MEAN, CLIP_STD, CLIPVision, preprocess
from wanpack.runtime.models.weight_dict import block_view

transformers = pytest.importorskip("transformers")

CFG = encoder_config("clip", dim_scale="tiny")  # dim 40, 2 heads of 20, mlp 80, 3 blocks of which 2 are used, 224/14
# fp32 on both sides, same math in a different order (SDPA vs eager attention, fused vs split q/k/v): outputs up to
# ~6 in magnitude agree to a few fp32 ulps (measured max abs error 1.5e-6).
FP32_ATOL = 1e-5


def clip_weights(cfg: CLIPConfig = CFG, seed: int = 0) -> dict[str, torch.Tensor]:
    return {s.name: random_tensor(s, seed, torch.float32) for s in clip_tensors(cfg)}


def to_hf(w: dict[str, torch.Tensor], cfg: CLIPConfig, p: str) -> dict[str, torch.Tensor]:
    """Wan/open-clip key -> transformers CLIPVisionModel key (prefix ``p``); the fused to_qkv rows are [q; k; v]."""
    d = cfg.dim
    hf = {p + "embeddings.class_embedding": w["visual.cls_embedding"].reshape(d),
          p + "embeddings.patch_embedding.weight": w["visual.patch_embedding.weight"],
          p + "embeddings.position_embedding.weight": w["visual.pos_embedding"][0],
          p + "pre_layrnorm.weight": w["visual.pre_norm.weight"], p + "pre_layrnorm.bias": w["visual.pre_norm.bias"],
          p + "post_layernorm.weight": torch.ones(d), p + "post_layernorm.bias": torch.zeros(d)}  # fmt: skip
    for n in range(cfg.num_layers):
        src, dst = f"visual.transformer.{n}.", f"{p}encoder.layers.{n}."
        for kind in ("weight", "bias"):
            q, k, v = w[src + f"attn.to_qkv.{kind}"].chunk(3, dim=0)
            hf.update({dst + f"self_attn.q_proj.{kind}": q, dst + f"self_attn.k_proj.{kind}": k,
                       dst + f"self_attn.v_proj.{kind}": v})  # fmt: skip
            hf[dst + f"self_attn.out_proj.{kind}"] = w[src + f"attn.proj.{kind}"]
            hf[dst + f"layer_norm1.{kind}"] = w[src + f"norm1.{kind}"]
            hf[dst + f"layer_norm2.{kind}"] = w[src + f"norm2.{kind}"]
            hf[dst + f"mlp.fc1.{kind}"] = w[src + f"mlp.0.{kind}"]
            hf[dst + f"mlp.fc2.{kind}"] = w[src + f"mlp.2.{kind}"]
    return hf


def hf_model(w, cfg: CLIPConfig = CFG):
    config = transformers.CLIPVisionConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim, num_attention_heads=cfg.num_heads,
        num_hidden_layers=cfg.num_layers, image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
        hidden_act="gelu", layer_norm_eps=cfg.eps, attention_dropout=0.0,
    )  # fmt: skip
    model = transformers.CLIPVisionModel._from_config(config, attn_implementation="eager").eval()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""  # v4 | v5
    missing, unexpected = model.load_state_dict(to_hf(w, cfg, prefix), strict=False)
    assert not unexpected and not missing
    return model


def images(batch: int = 2, h: int = 180, w: int = 320, seed: int = 3) -> torch.Tensor:
    """Non-square RGB images in [-1, 1], like a 16:9 first frame."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=gen) * 2 - 1


@pytest.fixture(scope="module")
def weights():
    return clip_weights()


def test_matches_transformers_clip_vision(weights):
    """Our output = transformers' hidden state after block use_layers (2 of 3 here; 31 of 32 for the real model)."""
    img = images()
    ours = CLIPVision(CFG, dtype=torch.float32)(weights, img)
    with torch.no_grad():
        out = hf_model(weights)(pixel_values=preprocess(img), output_hidden_states=True)
    assert len(out.hidden_states) == CFG.num_layers + 1  # [0] is the pre-norm embedding, [n] is after block n
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    ref = out.hidden_states[CFG.use_layers]
    assert ours.shape == (2, CFG.num_tokens, CFG.dim) == (2, 257, 40)
    err = (ours - ref).abs().max().item()
    assert err < FP32_ATOL, f"max abs error {err:.2e}"
    # and the skipped last block really changes things (so the test would catch running all of them)
    assert (out.hidden_states[-1] - ref).abs().max().item() > 1e-2


def test_preprocess_is_wan_normalization():
    """A flat image maps to ((v + 1) / 2 - mean) / std per channel; a 224x224 input is not resampled."""
    flat = torch.full((1, 3, 100, 300), 0.2)
    expected = (torch.tensor([0.6, 0.6, 0.6]) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    got = preprocess(flat)
    assert got.shape == (1, 3, 224, 224)
    torch.testing.assert_close(got, expected.view(1, 3, 1, 1).expand_as(got), rtol=0, atol=1e-5)
    img = images(1, 224, 224)
    same = preprocess(img) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(same, img * 0.5 + 0.5, rtol=0, atol=1e-5)


def test_preprocess_squashes_without_crop():
    """No centre crop: a left-red / right-blue 16:9 image keeps both halves after the resize to 224x224."""
    img = torch.full((1, 3, 90, 160), -1.0)
    img[0, 0, :, :80] = 1.0
    img[0, 2, :, 80:] = 1.0
    x = preprocess(img) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    assert x[0, 0, :, :100].min() > 0.99 and x[0, 2, :, 124:].min() > 0.99
    assert x[0, 0, :, 124:].max() < 0.01 and x[0, 2, :, :100].max() < 0.01


def test_phase_by_phase_equals_resident(weights):
    """What the streaming engine does gives the resident result exactly: each phase callable gets ONLY the tensors
    the manifest layout puts in that phase (manifests.arch.clip_tensors), with block-relative names."""
    enc = CLIPVision(CFG, dtype=torch.float32)
    assert enc.phases == CFG.phases
    img = images(1)
    non_block = {s.name: weights[s.name] for s in clip_tensors(CFG) if s.block is None}
    x, ctx = enc.embed(non_block, img)
    for n in range(enc.num_blocks):
        for phase in enc.phases:
            names = [s.name for s in clip_tensors(CFG) if s.block == n and s.phase == phase]
            only_phase = block_view({k: weights[k] for k in names}, enc.block_prefix(n))
            x = enc.phase(phase)(only_phase, x, ctx)
    assert torch.equal(enc.finish(non_block, x, ctx), enc(weights, img))


@pytest.mark.parametrize(("scheme", "bound"), [("int8", 0.02), ("fp8", 0.08)])
def test_quantized_block_close_to_fp32(weights, scheme, bound):
    """One block with int8 / fp8 per-channel weights vs fp32: relative L2 error of the block's update (x_out - x_in).

    Per Linear, int8 costs ~absmax/127/sqrt(12) ~ 0.6% of a Gaussian row's RMS and fp8 e4m3 ~ 2.7%; four Linears
    in two chains of two, so about 1% and 4% are expected (measured over 3 images: 0.9% and 3.9-4.0%); the bounds
    leave about 2x headroom.
    """
    enc = CLIPVision(CFG, dtype=torch.float32)
    x, _ = enc.embed(weights, images(1))
    ref = enc.block(block_view(weights, enc.block_prefix(0)), x) - x
    q = dict(weights)
    for spec in clip_tensors(CFG):
        if spec.quantize:
            q[spec.name], q[spec.name + "_scale"] = quantize_weight(weights[spec.name], scheme)
    got = enc.block(block_view(q, enc.block_prefix(0)), x) - x
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < bound, f"{scheme}: relative error {rel:.4f}"


def test_fp16_and_bf16_close_to_fp32(weights):
    """Reduced-precision compute (fp16 is what Wan uses for CLIP) stays within 2% relative L2 of fp32."""
    img = images(1)
    ref = CLIPVision(CFG, dtype=torch.float32)(weights, img)
    for dtype in (torch.float16, torch.bfloat16):
        got = CLIPVision(CFG, dtype=dtype)(weights, img).float()
        assert ((got - ref).norm() / ref.norm()).item() < 0.02, dtype


def test_runs_on_synth_checkpoint(tmp_path):
    """The hub-layout .pth synth writes (with the unused text tower, post_norm and head) loads and runs."""
    synth_checkpoint(tmp_path, "wan2.1-i2v-14b", layers=1, dim_scale="tiny", components=("clip",))
    state = torch.load(tmp_path / HUB_FILES["clip"], weights_only=True, mmap=True)
    assert "visual.post_norm.weight" in state and "textual.token_embedding.weight" in state
    out = CLIPVision(CFG, dtype=torch.float32)(state, images(1))
    assert out.shape == (1, 257, CFG.dim) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("img", "match"),
    [
        (torch.zeros(3, 64, 64), "batch, 3, height, width"),
        (torch.zeros(1, 1, 64, 64), "batch, 3, height, width"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float images"),
    ],
)
def test_bad_images_are_usage_errors(weights, img, match):
    with pytest.raises(UsageError, match=match):
        CLIPVision(CFG, dtype=torch.float32)(weights, img)


def test_bad_weights_are_pack_errors(weights):
    enc = CLIPVision(CFG, dtype=torch.float32)
    broken = {k: v for k, v in weights.items() if k != "visual.transformer.1.mlp.0.bias"}
    with pytest.raises(PackFormatError, match="mlp.0.bias"):
        enc(broken, images(1))
    with pytest.raises(PackFormatError, match="visual.pos_embedding"):
        enc({k: v for k, v in weights.items() if k != "visual.pos_embedding"}, images(1))
    with pytest.raises(UsageError, match="no phase"):
        enc.phase("ffn")


@pytest.mark.gpu
def test_gpu_fp16_matches_cpu(weights):
    """On CUDA in fp16 (Wan's CLIP precision), images handed over on the CPU: within 2% of the CPU fp32 run."""
    img = images(2)
    ref = CLIPVision(CFG, dtype=torch.float32)(weights, img)
    got = CLIPVision(CFG, dtype=torch.float16)({k: v.cuda() for k, v in weights.items()}, img)
    assert got.is_cuda and got.shape == ref.shape
    assert ((got.float().cpu() - ref).norm() / ref.norm()).item() < 0.02


def test_converted_int8_pack_runs(tmp_path):
    """synth -> `convert --quant int8` -> the pack's CLIP tensors (text tower, post_norm and head dropped) give the
    fp32 source's features within 2% rel L2 (measured 0.8%)."""
    from safetensors.torch import load_file

    from wanpack.convert.converter import ConvertOptions, convert_checkpoint

    synth_checkpoint(tmp_path / "src", "wan2.1-i2v-14b", layers=1, dim_scale="tiny", components=("clip",))
    convert_checkpoint(tmp_path / "src", tmp_path / "pack", ConvertOptions(components=("clip",), quant="int8"))
    packed = {k: v for shard in sorted((tmp_path / "pack" / "clip").glob("*.safetensors"))
              for k, v in load_file(shard).items() if not k.startswith("__wanpack_pad")}  # fmt: skip
    assert packed["visual.transformer.0.attn.to_qkv.weight"].dtype == torch.int8
    assert not any(k.startswith(("textual.", "visual.post_norm", "visual.head")) for k in packed)
    source = torch.load(tmp_path / "src" / HUB_FILES["clip"], weights_only=True)
    enc, img = CLIPVision(CFG, dtype=torch.float32), images(1)
    got, ref = enc(packed, img), enc(source, img)
    assert ((got - ref).norm() / ref.norm()).item() < 0.02
