"""Architecture tables and `wanpack synth` against the reference facts (key counts, parameter counts, hub layout)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from wanpack.convert.synth import DIT_INDEX, synth_checkpoint
from wanpack.manifests import arch


@pytest.mark.parametrize(
    ("name", "keys", "per_block", "params_b"),
    [("wan2.1-t2v-1.3b", 825, 27, 1.419), ("wan2.1-t2v-14b", 1095, 27, 14.29), ("wan2.1-i2v-14b", 1303, 32, 16.39)],
)
def test_dit_layout_matches_reference_counts(name, keys, per_block, params_b):
    summary = arch.summarize(arch.dit_config(name))
    assert summary.keys == keys
    assert set(summary.per_block_keys.values()) == {per_block}
    assert summary.params / 1e9 == pytest.approx(params_b, abs=0.01)


def test_encoder_layouts_match_reference_sizes():
    assert arch.summarize(arch.encoder_config("t5")).params / 1e9 == pytest.approx(5.68, abs=0.01)
    assert arch.summarize(arch.encoder_config("vae")).params / 1e6 == pytest.approx(126.9, abs=0.1)
    vae_keys = {s.name: s.shape for s in arch.vae_tensors(arch.encoder_config("vae"))}
    assert vae_keys["decoder.conv1.weight"] == (384, 16, 3, 3, 3)
    assert vae_keys["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert vae_keys["conv1.weight"] == (32, 32, 1, 1, 1)
    assert "encoder.downsamples.5.time_conv.weight" in vae_keys and "encoder.downsamples.2.time_conv.weight" not in vae_keys


def test_synth_shards_and_index_are_consistent_and_seeded(tmp_path):
    synth_checkpoint(tmp_path / "a", "wan2.1-i2v-14b", layers=2, dim_scale="tiny", shards=3, seed=7)
    synth_checkpoint(tmp_path / "b", "wan2.1-i2v-14b", layers=2, dim_scale="tiny", shards=1, seed=7)
    index = json.loads((tmp_path / "a" / DIT_INDEX).read_text())
    expected = {s.name for s in arch.dit_tensors(arch.dit_config("wan2.1-i2v-14b", layers=2, dim_scale="tiny"))}
    assert set(index["weight_map"]) == expected
    total = 0
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(tmp_path / "a" / fname), "pt") as f, safe_open(
            str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"), "pt"
        ) as g:
            for key in f.keys():
                assert index["weight_map"][key] == fname
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
                assert torch.equal(t, g.get_tensor(key)), key  # same seed, same values, whatever the sharding
    assert index["metadata"]["total_size"] == total
    hub = json.loads((tmp_path / "a" / "config.json").read_text())
    assert hub["_class_name"] == "WanModel" and hub["model_type"] == "i2v" and hub["num_layers"] == 2


def test_synth_different_seeds_differ(tmp_path):
    synth_checkpoint(tmp_path / "a", "wan2.1-t2v-1.3b", layers=1, dim_scale="tiny", seed=1)
    synth_checkpoint(tmp_path / "b", "wan2.1-t2v-1.3b", layers=1, dim_scale="tiny", seed=2)
    name = "blocks.0.ffn.0.weight"
    with safe_open(str(tmp_path / "a" / "diffusion_pytorch_model.safetensors"), "pt") as f, safe_open(
        str(tmp_path / "b" / "diffusion_pytorch_model.safetensors"), "pt"
    ) as g:
        assert not torch.equal(f.get_tensor(name), g.get_tensor(name))


def test_random_block_weights_are_block_relative_and_quantized_like_the_converter():
    from wanpack.convert.quantize import quantize_weight
    from wanpack.convert.synth import random_block_weights, random_tensor
    from wanpack.manifests.arch import clip_tensors, dit_config, dit_tensors, encoder_config

    cfg = dit_config("wan2.1-t2v-14b", layers=2, dim_scale="tiny")
    specs = dit_tensors(cfg)
    w = random_block_weights(specs, 1, "int8")
    spec = next(s for s in specs if s.name == "blocks.1.ffn.0.weight")
    q, s = quantize_weight(random_tensor(spec, 0, torch.float32), "int8")
    assert torch.equal(w["ffn.0.weight"], q) and torch.equal(w["ffn.0.weight_scale"], s)
    assert w["norm3.weight"].dtype == torch.bfloat16 and "modulation" in w
    assert len(w) == sum(s.block == 1 for s in specs) + sum(s.block == 1 and s.quantize for s in specs)
    assert all(t.dtype == torch.float32 for t in random_block_weights(specs, 0, "fp32").values())
    clip = random_block_weights(clip_tensors(encoder_config("clip", dim_scale="tiny")), 0, "bf16")
    assert "norm1.weight" in clip and not any(k.startswith("visual") for k in clip)


def test_arch_is_checked_against_the_config_shapes():
    from wanpack.errors import UsageError
    from wanpack.manifests.arch import check_arch_matches, dit_config

    small = dit_config("wan2.1-t2v-1.3b", layers=1)
    with pytest.raises(UsageError, match="its dim is 1536, wan2.1-t2v-14b has 5120 - pass --arch wan2.1-t2v-1.3b"):
        check_arch_matches(small, "wan2.1-t2v-14b")
    with pytest.raises(UsageError, match="model_type is t2v"):
        check_arch_matches(small, "wan2.1-i2v-14b")
    check_arch_matches(small, "wan2.1-t2v-1.3b")
    check_arch_matches(dit_config("wan2.1-i2v-14b", layers=2, dim_scale="tiny"), "wan2.1-i2v-14b")  # test widths
    with pytest.raises(UsageError, match="declares wan2.1-i2v-14b"):
        check_arch_matches(dit_config("wan2.1-t2v-14b", dim_scale="tiny"), "wan2.1-t2v-14b", "wan2.1-i2v-14b")
