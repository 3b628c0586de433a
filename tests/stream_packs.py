"""Tiny packs for the streaming tests, written straight from the manifest schema (independent of the converter).

Random weights from the arch's key list, quantized with the project's quantizer, laid out with the shard planner:
one shard per block (``by_block``) or everything in one file (``single``), phases as aligned groups.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wanpack.convert.quantize import quantize_weight
from wanpack.convert.safetensors_io import PlannedTensor, ShardWriter, plan_shard, st_dtype
from wanpack.convert.synth import random_tensor
from wanpack.manifests.arch import config_to_dict, dit_config, dit_tensors
from wanpack.manifests.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    BlockEntry,
    ComponentEntry,
    Manifest,
    QuantInfo,
    RangeEntry,
    ShardEntry,
    SourceInfo,
    TensorEntry,
    write_manifest,
)

QINFO = {
    "int8": QuantInfo("int8", "I8", qmax=127.0),
    "fp8": QuantInfo("fp8", "F8_E4M3", qmax=448.0),
    "none": QuantInfo("none", "BF16", activation="none"),
}


def pack_tensors(cfg, quant: str, seed: int = 0) -> list[tuple[str, torch.Tensor, int | None, str | None]]:
    """(name, tensor, block, phase) in pack order: blocks by phase, scales right after their weight, then non-block."""
    out = []
    for spec in dit_tensors(cfg):
        w = random_tensor(spec, seed, torch.float32)
        if spec.quantize and quant != "none":
            q, s = quantize_weight(w, quant)
            out += [(spec.name, q, spec.block, spec.phase), (spec.name + "_scale", s, spec.block, spec.phase)]
        else:
            out.append((spec.name, w.to(torch.bfloat16), spec.block, spec.phase))
    blocks = sorted((t for t in out if t[2] is not None), key=lambda t: (t[2], cfg.phases.index(t[3])))
    return blocks + [t for t in out if t[2] is None]


def _write(path: Path, items, group_of) -> tuple[int, str, dict, list[TensorEntry]]:
    planned = [PlannedTensor(n, st_dtype(t.dtype), tuple(t.shape), group=group_of(b, p)) for n, t, b, p in items]
    layout = plan_shard(planned, {"format": "pt"})
    with ShardWriter(path, layout) as w:
        for n, t, _, _ in items:
            w.write(n, t)
        sha = w.close()
    by_name = {t.name: t for t in layout.real_tensors()}
    entries = []
    for n, t, b, p in items:
        pt = by_name[n]
        quantized = t.dtype in (torch.int8, torch.float8_e4m3fn)
        entries.append(TensorEntry(n, pt.dtype, list(pt.shape), pt.offset, pt.length, b, p,
                                   scale=n + "_scale" if quantized else None, quantized=quantized))  # fmt: skip
    return layout.file_size, sha, layout.groups, entries


def make_pack(root: Path, arch: str = "wan2.1-t2v-14b", layers: int = 3, quant: str = "int8",
              layout: str = "by_block", dim_scale: str = "tiny", seed: int = 0) -> Path:  # fmt: skip
    """Write PACK/manifest.json + PACK/dit/*.safetensors and return the pack directory."""
    cfg = dit_config(arch, layers=layers, dim_scale=dim_scale)
    items = pack_tensors(cfg, quant, seed)
    (root / "dit").mkdir(parents=True, exist_ok=True)
    shards, blocks = [], []

    def block_entry(n: int, shard: str, groups: dict) -> BlockEntry:
        phases = [RangeEntry(ph, *groups[f"{n}:{ph}"]) for ph in cfg.phases if f"{n}:{ph}" in groups]
        return BlockEntry(n, shard, phases[0].offset, sum(p.length for p in phases), phases)

    if layout == "by_block":
        for n in range(cfg.num_layers):
            path = f"dit/block_{n}.safetensors"
            size, sha, groups, entries = _write(root / path, [t for t in items if t[2] == n], lambda b, p: f"{b}:{p}")
            shards.append(ShardEntry(path, size, sha, n, entries))
            blocks.append(block_entry(n, path, groups))
        path = "dit/non_block.safetensors"
        size, sha, _, entries = _write(root / path, [t for t in items if t[2] is None], lambda b, p: None)
        shards.append(ShardEntry(path, size, sha, None, entries))
    else:
        path = "dit/model.safetensors"
        size, sha, groups, entries = _write(root / path, items, lambda b, p: "non_block" if b is None else f"{b}:{p}")
        shards.append(ShardEntry(path, size, sha, None, entries))
        blocks = [block_entry(n, path, groups) for n in range(cfg.num_layers)]
    comp = ComponentEntry("dit", arch, config_to_dict(cfg), QINFO[quant], layout, cfg.num_layers, shards, blocks)
    manifest = Manifest(FORMAT_NAME, FORMAT_VERSION, "tests", SourceInfo("synthetic", "tests"), {"dit": comp})
    write_manifest(root, manifest)
    return root
