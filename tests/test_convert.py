"""The converter end to end: round trips, byte layout, source kinds, LoRA merge, LightX2V re-pack."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from wanpack.convert.converter import ConvertOptions, convert_checkpoint
from wanpack.convert.quantize import dequantize_weight, max_quant_error, quantize_weight
from wanpack.convert.safetensors_io import write_safetensors
from wanpack.convert.synth import DIT_SINGLE, synth_checkpoint, synth_lora
from wanpack.manifests import arch
from wanpack.manifests.format import ALIGNMENT, TENSOR_ALIGNMENT, read_manifest


def source_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every DiT tensor of a synthetic hub folder (single file or shards)."""
    out = {}
    for f in sorted(src.glob("diffusion_pytorch_model*.safetensors")):
        with safe_open(str(f), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys()})
    return out


def pack_tensors(pack: Path, component: str = "dit") -> dict[str, torch.Tensor]:
    manifest = read_manifest(pack)
    out = {}
    for shard in manifest.component(component).shards:
        with safe_open(str(pack / shard.path), "pt") as g:
            out.update({k: g.get_tensor(k) for k in g.keys() if not k.startswith("__wanpack_pad_")})
    return out


@pytest.mark.parametrize("scheme", ["int8", "fp8", "none"])
def test_round_trip_every_scheme(tiny_t2v, tmp_path, scheme):
    manifest, stats = convert_checkpoint(tiny_t2v, tmp_path / "pack", ConvertOptions(quant=scheme))
    src, packed = source_tensors(tiny_t2v), pack_tensors(tmp_path / "pack")
    specs = {s.name: s for s in arch.dit_tensors(arch.config_from_dict(manifest.components["dit"].config))}
    assert set(specs) | {n + "_scale" for n, s in specs.items() if s.quantize and scheme != "none"} == set(packed)
    for name, spec in specs.items():
        if spec.quantize and scheme != "none":
            q, scale = packed[name], packed[name + "_scale"]
            assert q.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[scheme]
            assert scale.dtype == torch.float32 and scale.shape == (spec.shape[0], 1)
            err = (dequantize_weight(q, scale) - src[name]).abs()
            assert (err <= max_quant_error(src[name], scheme) + 1e-12).all(), name
            ref_q, ref_scale = quantize_weight(src[name], scheme)
            assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_scale)
        else:
            assert packed[name].dtype == torch.bfloat16
            assert torch.equal(packed[name], src[name].to(torch.bfloat16)), name
    assert stats.source_bytes == sum(t.numel() * t.element_size() for t in src.values())


def test_keep_fp32_keeps_sensitive_tensors_bit_exact(tiny_t2v, tmp_path):
    convert_checkpoint(tiny_t2v, tmp_path / "pack", ConvertOptions(keep_fp32=True))
    src, packed = source_tensors(tiny_t2v), pack_tensors(tmp_path / "pack")
    for name in ("blocks.0.modulation", "head.head.weight", "time_projection.1.weight", "blocks.1.norm3.weight"):
        assert packed[name].dtype == torch.float32 and torch.equal(packed[name], src[name])
    assert packed["blocks.0.self_attn.q.bias"].dtype == torch.bfloat16  # biases are not "sensitive"


@pytest.mark.parametrize("by_block", [True, False])
def test_manifest_offsets_and_alignment(tiny_t2v, tmp_path, by_block):
    pack = tmp_path / "pack"
    manifest, _ = convert_checkpoint(tiny_t2v, pack, ConvertOptions(save_by_block=by_block))
    comp = manifest.components["dit"]
    names = sorted(p.name for p in (pack / "dit").iterdir())
    if by_block:
        assert names == ["block_0.safetensors", "block_1.safetensors", "non_block.safetensors"]
    else:
        assert names == ["model.safetensors"]
    for shard in comp.shards:
        raw = (pack / shard.path).read_bytes()
        assert len(raw) == shard.size and len(raw) % ALIGNMENT == 0
        with safe_open(str(pack / shard.path), "pt") as g:  # a valid safetensors file
            for t in shard.tensors:
                value = g.get_tensor(t.name)
                assert t.offset % TENSOR_ALIGNMENT == 0
                assert raw[t.offset : t.offset + t.length] == value.contiguous().view(torch.uint8).numpy().tobytes()
    for block in comp.blocks:
        assert [p.name for p in block.phases] == ["self_attn", "cross_attn", "ffn"]
        assert block.offset % ALIGNMENT == 0 and block.length % ALIGNMENT == 0
        end = block.offset
        for phase in block.phases:
            assert phase.offset == end and phase.offset % ALIGNMENT == 0 and phase.length % ALIGNMENT == 0
            end += phase.length
            tensors = [t for t in comp.shard(block.shard).tensors if t.block == block.index and t.phase == phase.name]
            assert tensors and all(phase.offset <= t.offset < phase.offset + phase.length for t in tensors)
        assert end == block.offset + block.length


def test_sharded_and_single_sources_give_identical_packs(tmp_path):
    synth_checkpoint(tmp_path / "one", "wan2.1-t2v-1.3b", layers=2, dim_scale="tiny", shards=1)
    synth_checkpoint(tmp_path / "three", "wan2.1-t2v-1.3b", layers=2, dim_scale="tiny", shards=3)
    a, _ = convert_checkpoint(tmp_path / "one", tmp_path / "pa", ConvertOptions(hash_source=False))
    b, _ = convert_checkpoint(tmp_path / "three", tmp_path / "pb", ConvertOptions(hash_source=False))
    assert [s.sha256 for s in a.components["dit"].shards] == [s.sha256 for s in b.components["dit"].shards]


def test_source_files_are_hashed(tiny_t2v, tmp_path):
    import hashlib

    manifest, _ = convert_checkpoint(tiny_t2v, tmp_path / "pack", ConvertOptions(components=("dit", "t5")))
    for f in manifest.source.files:
        assert f.sha256 == hashlib.sha256((tiny_t2v / f.name).read_bytes()).hexdigest(), f.name
    assert {f.name for f in manifest.source.files} >= {"models_t5_umt5-xxl-enc-bf16.pth"}


def test_all_components_i2v(tiny_i2v, tmp_path):
    manifest, _ = convert_checkpoint(tiny_i2v, tmp_path / "pack", ConvertOptions(components=("all",)))
    assert list(manifest.components) == ["dit", "t5", "clip", "vae"]
    clip = pack_tensors(tmp_path / "pack", "clip")
    assert not any(k.startswith(("textual.", "visual.head", "log_scale", "visual.post_norm")) for k in clip)
    assert clip["visual.transformer.0.attn.to_qkv.weight"].dtype == torch.int8
    vae_src = torch.load(tiny_i2v / "Wan2.1_VAE.pth", weights_only=True)
    vae = pack_tensors(tmp_path / "pack", "vae")
    assert set(vae) == set(vae_src) and all(torch.equal(vae[k], vae_src[k]) for k in vae)  # copied unquantized
    t5 = pack_tensors(tmp_path / "pack", "t5")
    assert t5["blocks.0.attn.q.weight"].dtype == torch.int8 and t5["token_embedding.weight"].dtype == torch.bfloat16
    assert manifest.components["t5"].num_blocks == 2 and manifest.components["clip"].blocks[0].phases[1].name == "mlp"


@pytest.mark.parametrize(("style", "alpha", "strength"), [("up_down", None, 1.0), ("A_B", 2.0, 0.5)])
def test_lora_merge_matches_hand_computation(tmp_path, style, alpha, strength):
    src = tmp_path / "src"
    synth_checkpoint(src, "wan2.1-t2v-1.3b", layers=1, dim_scale="tiny")
    cfg = arch.dit_config("wan2.1-t2v-1.3b", layers=1, dim_scale="tiny")
    lora_path = synth_lora(tmp_path / "lora.safetensors", cfg, rank=4, style=style, alpha=alpha)
    convert_checkpoint(src, tmp_path / "pack", ConvertOptions(quant="none", keep_fp32=False,
                                                              loras=[(str(lora_path), strength)]))  # fmt: skip
    packed, base = pack_tensors(tmp_path / "pack"), source_tensors(src)
    with safe_open(str(lora_path), "pt") as g:
        lora = {k: g.get_tensor(k) for k in g.keys()}
    up_k, down_k = ("lora_up", "lora_down") if style == "up_down" else ("lora_B", "lora_A")
    name = "blocks.0.ffn.0.weight"
    up = lora[f"diffusion_model.blocks.0.ffn.0.{up_k}.weight"].float()
    down = lora[f"diffusion_model.blocks.0.ffn.0.{down_k}.weight"].float()
    rank = down.shape[0]
    expected = base[name] + strength * ((alpha or rank) / rank) * (up @ down)
    assert torch.equal(packed[name], expected.to(torch.bfloat16))
    assert torch.equal(packed["blocks.0.modulation"], base["blocks.0.modulation"].to(torch.bfloat16))  # untouched


def test_lora_diff_keys_and_bad_target(tmp_path):
    src = tmp_path / "src"
    synth_checkpoint(src, "wan2.1-t2v-1.3b", layers=1, dim_scale="tiny")
    base = source_tensors(src)
    delta_b = torch.full_like(base["blocks.0.self_attn.q.bias"], 0.25)
    delta_n = torch.full_like(base["blocks.0.norm3.weight"], -0.5)
    write_safetensors(tmp_path / "d.safetensors", {"diffusion_model.blocks.0.self_attn.q.diff_b": delta_b,
                                                    "diffusion_model.blocks.0.norm3.diff": delta_n})  # fmt: skip
    convert_checkpoint(src, tmp_path / "pack", ConvertOptions(quant="none", keep_fp32=True,
                                                              loras=[(str(tmp_path / "d.safetensors"), 2.0)]))  # fmt: skip
    packed = pack_tensors(tmp_path / "pack")
    assert torch.equal(packed["blocks.0.norm3.weight"], base["blocks.0.norm3.weight"] + 2.0 * delta_n)
    assert torch.equal(packed["blocks.0.self_attn.q.bias"], (base["blocks.0.self_attn.q.bias"] + 0.5).to(torch.bfloat16))
    write_safetensors(tmp_path / "bad.safetensors", {"blocks.7.ffn.0.lora_up.weight": torch.ones(128, 2),
                                                      "blocks.7.ffn.0.lora_down.weight": torch.ones(2, 64)})  # fmt: skip
    from wanpack.errors import SourceError

    with pytest.raises(SourceError, match="blocks.7.ffn.0.weight"):
        convert_checkpoint(src, tmp_path / "p2", ConvertOptions(loras=[(str(tmp_path / "bad.safetensors"), 1.0)]))
    assert not (tmp_path / "p2").exists()


def _lightx2v_dir(src: Path, out: Path, scheme: str) -> dict[str, torch.Tensor]:
    """Write a LightX2V-style quantized block folder from a synthetic source; return what it holds."""
    tensors = source_tensors(src)
    cfg = arch.config_from_dict(json.loads((src / "wanpack_synth.json").read_text())["configs"]["dit"])
    out.mkdir()
    written: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for spec in arch.dit_tensors(cfg):
        fname = "non_block.safetensors" if spec.block is None else f"block_{spec.block}.safetensors"
        group = groups.setdefault(fname, {})
        if spec.quantize:
            q, s = quantize_weight(tensors[spec.name], scheme)
            group[spec.name], group[spec.name + "_scale"] = q, s
        else:
            group[spec.name] = tensors[spec.name].to(torch.bfloat16)
    for fname, group in groups.items():
        write_safetensors(out / fname, group)
        written.update(group)
    (out / "config.json").write_text(json.dumps(cfg.hub_config()))
    return written


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_lightx2v_quantized_folder_is_repacked_without_requantizing(tmp_path, scheme):
    src = tmp_path / "src"
    synth_checkpoint(src, "wan2.1-t2v-14b", layers=2, dim_scale="tiny")
    lx = _lightx2v_dir(src, tmp_path / "lightx2v", scheme)
    lx_dir = tmp_path / "lightx2v"
    manifest, _ = convert_checkpoint(lx_dir, tmp_path / "pack", ConvertOptions(quant=scheme, arch="wan2.1-t2v-14b"))
    assert manifest.source.kind == "lightx2v"
    packed = pack_tensors(tmp_path / "pack")
    assert set(packed) == set(lx)
    for k, v in lx.items():
        assert torch.equal(packed[k].view(torch.uint8), v.view(torch.uint8)), k
    from wanpack.errors import UsageError

    other = "fp8" if scheme == "int8" else "int8"
    with pytest.raises(UsageError, match=f"already {scheme}-quantized"):
        convert_checkpoint(lx_dir, tmp_path / "p2", ConvertOptions(quant=other, arch="wan2.1-t2v-14b"))
    convert_checkpoint(lx_dir, tmp_path / "p3", ConvertOptions(quant="none", arch="wan2.1-t2v-14b"))
    deq = pack_tensors(tmp_path / "p3")["blocks.1.ffn.2.weight"]
    name = "blocks.1.ffn.2.weight"
    assert torch.equal(deq, dequantize_weight(lx[name], lx[name + "_scale"], torch.bfloat16))


def test_single_safetensors_file_with_prefix(tmp_path):
    src = tmp_path / "src"
    synth_checkpoint(src, "wan2.1-t2v-1.3b", layers=1, dim_scale="tiny")
    tensors = source_tensors(src)
    write_safetensors(tmp_path / "distilled.safetensors", {"model.diffusion_model." + k: v for k, v in tensors.items()})
    cfg_file = src / "config.json"
    os.replace(cfg_file, tmp_path / "config.json")
    (tmp_path / "wanpack_synth.json").write_bytes((src / "wanpack_synth.json").read_bytes())
    manifest, _ = convert_checkpoint(tmp_path / "distilled.safetensors", tmp_path / "pack", ConvertOptions(quant="none"))
    assert manifest.components["dit"].arch == "wan2.1-t2v-1.3b"
    assert torch.equal(pack_tensors(tmp_path / "pack")["head.head.weight"], tensors["head.head.weight"].to(torch.bfloat16))


def test_hub_config_decides_arch_without_flag(tmp_path):
    src = tmp_path / "src"
    synth_checkpoint(src, "wan2.1-i2v-14b", layers=1, dim_scale="tiny")
    (src / "wanpack_synth.json").unlink()  # like a real hub folder: only config.json describes the model
    manifest, _ = convert_checkpoint(src, tmp_path / "pack", ConvertOptions())
    assert manifest.components["dit"].arch == "wan2.1-i2v-14b"
    assert manifest.components["dit"].config["dim"] == 64 and (src / DIT_SINGLE).is_file()


def test_random_source_pack_equals_converted_synthetic_checkpoint(tmp_path):
    """`synth --as-pack` is the converter with generated tensors: byte-identical shards to synth + convert."""
    from wanpack.convert.synth_pack import synth_pack

    synth_checkpoint(tmp_path / "src", "wan2.1-i2v-14b", layers=2, dim_scale="tiny", dtype="bf16",
                     components=("dit", "t5", "clip", "vae"))  # fmt: skip
    a, _ = convert_checkpoint(tmp_path / "src", tmp_path / "pa", ConvertOptions(components=("all",), hash_source=False))
    b, _ = synth_pack(tmp_path / "pb", "wan2.1-i2v-14b", layers=2, dim_scale="tiny",
                      components=("dit", "t5", "clip", "vae"))  # fmt: skip
    for name in ("dit", "t5", "clip", "vae"):
        assert [(s.path, s.sha256) for s in a.components[name].shards] == [
            (s.path, s.sha256) for s in b.components[name].shards
        ], name
    assert a.components["t5"].files == b.components["t5"].files and b.source.kind == "synthetic"


def test_source_hash_is_taken_from_the_hub_cache_blob_name(tmp_path):
    """A snapshot symlink into blobs/<sha256> (the HF cache layout) is described without re-hashing it."""
    src = tmp_path / "src"
    synth_checkpoint(src, "wan2.1-t2v-1.3b", layers=1, dim_scale="tiny")
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    fake_digest = "ab" * 32  # not the file's real digest: proves the name was used, not the bytes
    (src / DIT_SINGLE).rename(blobs / fake_digest)
    (src / DIT_SINGLE).symlink_to(blobs / fake_digest)
    manifest, _ = convert_checkpoint(src, tmp_path / "pack", ConvertOptions())
    assert {f.name: f.sha256 for f in manifest.source.files}[DIT_SINGLE] == fake_digest


def _lora_cases() -> list[tuple[str, dict, str]]:
    up, down = "diffusion_model.blocks.0.ffn.0.lora_up.weight", "diffusion_model.blocks.0.ffn.0.lora_down.weight"
    ok_up, ok_down = torch.full((128, 2), 0.01), torch.full((2, 64), 0.01)  # tiny 1.3B ffn.0 is [128, 64]
    nan_up = ok_up.clone()
    nan_up[3, 1] = float("nan")
    inf_diff = torch.zeros(64)
    inf_diff[0] = float("inf")
    return [
        ("NaN in lora_up", {up: nan_up, down: ok_down}, "NaN or infinite"),
        ("inf in a diff", {"diffusion_model.blocks.0.norm3.diff": inf_diff}, "NaN or infinite"),
        ("finite but the product overflows", {up: torch.full((128, 2), 1e30), down: torch.full((2, 64), 1e30)},
         "gives NaN or infinite"),
        ("3-D lora_up", {up: torch.zeros(128, 2, 1), down: ok_down}, "expected two matrices"),
        ("rank 0", {up: torch.zeros(128, 0), down: torch.zeros(0, 64)}, "rank 1..min(out, in)"),
        ("up and down ranks differ", {up: torch.zeros(128, 3), down: ok_down}, "rank 1..min(out, in)"),
        ("alpha of four values", {up: ok_up, down: ok_down, "diffusion_model.blocks.0.ffn.0.alpha": torch.ones(4)},
         "expected one value"),
        ("integer weights", {up: ok_up.to(torch.int32), down: ok_down}, "not a float tensor"),
    ]  # fmt: skip


@pytest.mark.parametrize(("label", "tensors", "message"), _lora_cases(), ids=[c[0] for c in _lora_cases()])
def test_hostile_lora_is_refused_with_one_line(tmp_path, label, tensors, message):
    from typer.testing import CliRunner

    from wanpack.cli import app

    src = tmp_path / "src"
    synth_checkpoint(src, "wan2.1-t2v-1.3b", layers=1, dim_scale="tiny")
    write_safetensors(tmp_path / "lora.safetensors", tensors)
    res = CliRunner().invoke(app, ["convert", str(src), "--quant", "none", "--lora", str(tmp_path / "lora.safetensors"),
                                   "--out", str(tmp_path / "pack")])  # fmt: skip
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 1 and "Traceback" not in res.output and lines[-1].startswith("error:"), res.output
    assert message in " ".join(lines)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["lora.safetensors", "src"]


def test_lora_strength_must_be_finite(tmp_path, tiny_t2v):
    from wanpack.errors import UsageError

    lora = tmp_path / "l.safetensors"
    write_safetensors(lora, {"blocks.0.norm3.diff": torch.zeros(64)})
    with pytest.raises(UsageError, match="not a finite number"):
        convert_checkpoint(tiny_t2v, tmp_path / "p", ConvertOptions(loras=[(str(lora), float("nan"))]))
