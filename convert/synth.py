"""Synthetic checkpoints in the exact public Wan2.1 hub layout, with random weights.

Nothing in tests or CI may download real weights, so every test, benchmark and the embedded demo start here. The
files are byte-for-byte the formats the hub uses: the DiT as one or K safetensors shards (+ the index json), the
T5, CLIP and VAE as torch state-dict ``.pth`` files, and a config.json with the hub's fields. Values are seeded per
tensor name, so the same key gets the same values whatever the sharding or the order of writing. The folder appears
atomically, as a pack does (convert/atomic.py): written into a hidden sibling and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from wanpack.convert.atomic import AtomicPackDir
from wanpack.convert.safetensors_io import PlannedTensor, ShardWriter, plan_shard, st_dtype
from wanpack.convert.synth_tokenizer import synth_tokenizer
from wanpack.errors import UsageError
from wanpack.manifests.arch import (
    CLIPConfig,
    DiTConfig,
    TensorSpec,
    component_tensors,
    config_to_dict,
    dit_config,
    encoder_config,
)

SYNTH_DECLARATION = "wanpack_synth.json"  # tells the converter the configs of this synthetic checkpoint
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
HUB_FILES = {
    "t5": "models_t5_umt5-xxl-enc-bf16.pth",
    "clip": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    "vae": "Wan2.1_VAE.pth",
}
TOKENIZER_DIR = "google/umt5-xxl"
SOURCE_DTYPES = {"t5": torch.bfloat16, "clip": torch.float32, "vae": torch.float32}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the DiT dtypes Wan2.1 checkpoints are published in
OnBytes = Callable[[int], None]  # called with the bytes of each tensor written (progress)


def dit_shard_name(i: int, k: int) -> str:
    return f"diffusion_pytorch_model-{i:05d}-of-{k:05d}.safetensors"


def random_tensor(spec: TensorSpec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic values with sensible magnitudes: weights ~ N(0, 1/fan_in), norm gains near 1, small biases."""
    digest = hashlib.sha256(f"{seed}:{spec.name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    shape = spec.shape
    name = spec.name
    if name.endswith((".gamma", "norm_q.weight", "norm_k.weight", "norm_k_img.weight")) or (
        len(shape) == 1 and "norm" in name and name.endswith(".weight")
    ):
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    elif len(shape) == 0:
        t = torch.tensor(4.6052)  # CLIP's log_scale, ln(100)
    elif name.endswith(".bias") or len(shape) == 1:
        t = 0.02 * torch.randn(shape, generator=gen)
    elif "modulation" in name or "embedding" in name and len(shape) == 3 and shape[0] == 1:
        t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    else:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
    return t.to(dtype)


_BLOCK_LISTS = ("blocks", "transformer")  # the DiT's and T5's ``blocks.N.``, CLIP's ``visual.transformer.N.``


def random_block_weights(specs: list[TensorSpec], block: int, scheme: str,
                         device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:  # fmt: skip
    """One block's tensors with these values, block-relative names (``blocks.3.ffn.0.weight`` -> ``ffn.0.weight``), on
    ``device``: quantizable Linears as int8/fp8 + ``_scale`` exactly as the converter writes them when ``scheme`` is
    int8/fp8, everything else bf16 (all fp32 for ``fp32``). What benchmarks and GPU tests run a block on."""
    from wanpack.convert.quantize import quantize_weight

    out = {}
    for spec in specs:
        if spec.block != block:
            continue
        parts = spec.name.split(".")
        at = next(i for i in range(1, len(parts)) if parts[i] == str(block) and parts[i - 1] in _BLOCK_LISTS)
        name = ".".join(parts[at + 1 :])
        t = random_tensor(spec, 0, torch.float32)
        if spec.quantize and scheme in ("int8", "fp8"):
            q, s = quantize_weight(t, scheme)
            out[name], out[name + "_scale"] = q.to(device), s.to(device)
        else:
            out[name] = t.to(device, torch.float32 if scheme == "fp32" else torch.bfloat16)
    return out


def _chunks_by_bytes(specs: list[TensorSpec], k: int, itemsize: int) -> list[list[TensorSpec]]:
    """Split key-sorted tensors into k consecutive groups of roughly equal bytes, as the hub's shards are."""
    total = sum(math.prod(s.shape) * itemsize for s in specs)
    groups: list[list[TensorSpec]] = [[] for _ in range(k)]
    acc = 0
    for s in specs:
        idx = min(k - 1, int(acc * k / max(total, 1)))
        groups[idx].append(s)
        acc += math.prod(s.shape) * itemsize
    return [g for g in groups if g]


def _write_st(path: Path, specs: list[TensorSpec], seed: int, dtype: torch.dtype, on_bytes: OnBytes) -> int:
    entries = [PlannedTensor(s.name, st_dtype(dtype), s.shape) for s in specs]
    layout = plan_shard(entries, {"format": "pt"}, group_align=1, tensor_align=1)
    with ShardWriter(path, layout) as w:
        for s in specs:
            t = random_tensor(s, seed, dtype)
            w.write(s.name, t)
            on_bytes(t.numel() * t.element_size())
        w.close()
    return layout.file_size


def synth_dit(out: Path, cfg: DiTConfig, *, dtype: torch.dtype = torch.float32, shards: int = 1, seed: int = 0,
              on_bytes: OnBytes = lambda n: None) -> list[Path]:  # fmt: skip
    """Write config.json and the DiT weights (one file, or ``shards`` files + index json) into ``out``."""
    if shards < 1:
        raise UsageError(f"--shards must be at least 1, got {shards}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.hub_config(), indent=2) + "\n")
    specs = sorted(component_tensors(cfg), key=lambda s: s.name)  # the hub's files are key-sorted
    itemsize = torch.empty((), dtype=dtype).element_size()
    if shards == 1:
        _write_st(out / DIT_SINGLE, specs, seed, dtype, on_bytes)
        return [out / DIT_SINGLE]
    groups = _chunks_by_bytes(specs, shards, itemsize)
    weight_map, paths = {}, []
    for i, group in enumerate(groups, start=1):
        name = dit_shard_name(i, len(groups))
        _write_st(out / name, group, seed, dtype, on_bytes)
        weight_map.update({s.name: name for s in group})
        paths.append(out / name)
    total = sum(math.prod(s.shape) * itemsize for s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / DIT_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _extra_clip_tensors(cfg: CLIPConfig) -> Iterator[TensorSpec]:
    """Keys the real CLIP file carries that Wan never uses (the converter must drop them)."""
    yield TensorSpec("log_scale", ())
    yield TensorSpec("visual.post_norm.weight", (cfg.dim,))
    yield TensorSpec("visual.post_norm.bias", (cfg.dim,))
    yield TensorSpec("visual.head", (cfg.dim, 16))
    yield TensorSpec("textual.token_embedding.weight", (32, 16))


def _pth_specs(cfg) -> list[TensorSpec]:
    specs = list(component_tensors(cfg))
    return specs + list(_extra_clip_tensors(cfg)) if isinstance(cfg, CLIPConfig) else specs


def synth_pth(path: Path, cfg, *, seed: int = 0, dtype: torch.dtype | None = None,
              on_bytes: OnBytes = lambda n: None) -> Path:  # fmt: skip
    """Write a T5, CLIP or VAE source as a torch state-dict .pth, like the hub's files."""
    dtype = dtype or SOURCE_DTYPES[cfg.kind]
    state = {}
    for s in _pth_specs(cfg):
        state[s.name] = random_tensor(s, seed, dtype)
        on_bytes(state[s.name].numel() * state[s.name].element_size())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def synth_lora(path: Path, cfg: DiTConfig, *, rank: int = 4, seed: int = 0, style: str = "up_down",
               prefix: str = "diffusion_model.", alpha: float | None = None) -> Path:  # fmt: skip
    """A LoRA over every quantizable block Linear, in the naming the public distill LoRAs use."""
    tensors: dict[str, torch.Tensor] = {}
    for spec in component_tensors(cfg):
        if not spec.quantize:
            continue
        base = prefix + spec.name.removesuffix(".weight")
        out_f, in_f = spec.shape
        down = random_tensor(TensorSpec(base + ".down", (rank, in_f)), seed, torch.float32)
        up = random_tensor(TensorSpec(base + ".up", (out_f, rank)), seed, torch.float32) * 0.1
        a_name, b_name = (".lora_down.weight", ".lora_up.weight") if style == "up_down" else (".lora_A.weight",
                                                                                              ".lora_B.weight")  # fmt: skip
        tensors[base + a_name] = down.to(torch.bfloat16)
        tensors[base + b_name] = up.to(torch.bfloat16)
        if alpha is not None:
            tensors[base + ".alpha"] = torch.tensor(float(alpha))
    from wanpack.convert.safetensors_io import write_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, {"format": "pt"})
    return path


def synth_checkpoint(out: str | os.PathLike, arch: str, *, layers: int | None = None, dim_scale: str = "full",
                     dtype: str = "fp32", shards: int = 1, seed: int = 0, components: tuple[str, ...] = ("dit",),
                     force: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, list[Path]]:  # fmt: skip
    """The whole hub folder for ``arch``: DiT plus the requested encoders (clip only for i2v), published atomically.

    An existing non-empty ``out`` is replaced only with ``force``, and only if it is a synthetic checkpoint.
    ``progress(done, total)`` gets the tensor bytes written so far. Returns the files written, under ``out``.
    """
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r} - choose one of: {', '.join(DTYPES)}")
    if shards < 1:
        raise UsageError(f"--shards must be at least 1, got {shards}")
    cfg = dit_config(arch, layers=layers, dim_scale=dim_scale)
    encoders = {kind: encoder_config(kind, dim_scale=dim_scale) for kind in ("t5", "clip", "vae")}
    wanted = [k for k in encoders if k in components and (k != "clip" or cfg.model_type == "i2v")]
    total = _dit_bytes(cfg, DTYPES[dtype]) if "dit" in components else 0
    total += sum(_pth_bytes(encoders[k]) for k in wanted)
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    with AtomicPackDir(out, force=force, marker=SYNTH_DECLARATION, what="a synthetic checkpoint") as target:
        tmp = target.tmp  # leaving the block without commit() removes it (Ctrl-C, a full disk)
        configs = {"dit": config_to_dict(cfg), **{k: config_to_dict(c) for k, c in encoders.items()}}
        declaration = {"arch": arch, "dim_scale": dim_scale, "seed": seed,
                       "note": "random weights made by wanpack synth", "configs": configs}  # fmt: skip
        (tmp / SYNTH_DECLARATION).write_text(json.dumps(declaration, indent=1) + "\n")
        written: dict[str, list[Path]] = {}
        if "dit" in components:
            written["dit"] = synth_dit(tmp, cfg, dtype=DTYPES[dtype], shards=shards, seed=seed, on_bytes=on_bytes)
        for kind in wanted:
            enc = encoders[kind]
            written[kind] = [synth_pth(tmp / HUB_FILES[kind], enc, seed=seed, on_bytes=on_bytes)]
            if kind == "t5":  # the hub ships the tokenizer next to the T5 weights
                written["tokenizer"] = synth_tokenizer(tmp / TOKENIZER_DIR, vocab_size=enc.vocab,
                                                       max_length=enc.text_len)  # fmt: skip
        target.commit()
    return {k: [Path(out) / p.relative_to(tmp) for p in paths] for k, paths in written.items()}


def _dit_bytes(cfg: DiTConfig, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(s.shape) * itemsize for s in component_tensors(cfg))


def _pth_bytes(cfg) -> int:
    itemsize = torch.empty((), dtype=SOURCE_DTYPES[cfg.kind]).element_size()
    return sum(math.prod(s.shape) * itemsize for s in _pth_specs(cfg))
