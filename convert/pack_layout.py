"""Deciding every byte of a pack before writing any: which tensor goes to which shard, at which offset, in what dtype.

Inside a block shard tensors are grouped by phase in execution order; inside a phase the quantized weights come first,
then their scales, then the small tensors (biases, norms, modulation). Each phase starts on a 4096-byte boundary, so
the runtime moves a phase or a whole block with one aligned read and one host-to-device copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wanpack.convert.safetensors_io import PlannedTensor, ShardLayout, plan_shard, st_dtype
from wanpack.manifests.arch import TensorSpec
from wanpack.manifests.format import SCALE_SUFFIX, BlockEntry, QuantInfo, RangeEntry, ShardEntry, TensorEntry

QUANT_WEIGHT_DTYPES = {"int8": "I8", "fp8": "F8_E4M3"}
NON_BLOCK = "non_block"


@dataclass
class OutTensor:
    """One tensor of the pack and how it is produced from the source."""

    name: str
    spec: TensorSpec
    dtype: str  # safetensors dtype written
    shape: tuple[int, ...]
    role: str  # "qweight" | "scale" | "plain"


@dataclass
class ShardPlan:
    path: str  # relative to the pack dir
    block: int | None
    tensors: list[OutTensor]
    layout: ShardLayout = field(init=False)

    def __post_init__(self) -> None:
        entries = [PlannedTensor(t.name, t.dtype, t.shape, group=_group(t)) for t in self.tensors]
        meta = {"format": "pt", "wanpack": "1"}
        if self.block is not None:
            meta["block"] = str(self.block)
        self.layout = plan_shard(entries, meta)


def _group(t: OutTensor) -> str:
    return NON_BLOCK if t.spec.block is None else f"{t.spec.block}/{t.spec.phase}"


def quant_info(scheme: str, keep_fp32: bool, other: str = "BF16") -> QuantInfo:
    qmax = {"int8": 127.0, "fp8": 448.0}.get(scheme, 0.0)
    return QuantInfo(scheme=scheme, weight_dtype=QUANT_WEIGHT_DTYPES.get(scheme, other), other_dtype=other,
                     sensitive_dtype="F32" if keep_fp32 else other, qmax=qmax)  # fmt: skip


def out_tensors(spec: TensorSpec, quant: QuantInfo, keep_dtype: torch.dtype | None) -> list[OutTensor]:
    """The pack tensors one source tensor becomes (a quantized weight brings its scale)."""
    if spec.quantize and quant.scheme != "none":
        return [OutTensor(spec.name, spec, quant.weight_dtype, spec.shape, "qweight"),
                OutTensor(spec.name + SCALE_SUFFIX, spec, "F32", (spec.shape[0], 1), "scale")]  # fmt: skip
    if keep_dtype is not None:
        dtype = st_dtype(keep_dtype)
    else:
        dtype = quant.sensitive_dtype if spec.sensitive else quant.other_dtype
    return [OutTensor(spec.name, spec, dtype, spec.shape, "plain")]


def _phase_order(tensors: list[OutTensor], phases: tuple[str, ...]) -> list[OutTensor]:
    rank = {"qweight": 0, "scale": 1, "plain": 2}
    order = {p: i for i, p in enumerate(phases)}
    return sorted(tensors, key=lambda t: (order.get(t.spec.phase, len(order)), rank[t.role]))  # stable


def plan_component_shards(folder: str, specs: list[TensorSpec], phases: tuple[str, ...], quant: QuantInfo,
                          by_block: bool, keep_dtype: torch.dtype | None = None) -> list[ShardPlan]:  # fmt: skip
    """Shard plans for one component: block_N + non_block (by_block), or a single model.safetensors."""
    blocks: dict[int, list[OutTensor]] = {}
    rest: list[OutTensor] = []
    for spec in specs:
        outs = out_tensors(spec, quant, keep_dtype)
        (rest if spec.block is None else blocks.setdefault(spec.block, [])).extend(outs)
    ordered = {n: _phase_order(ts, phases) for n, ts in sorted(blocks.items())}
    if by_block:
        plans = [ShardPlan(f"{folder}/block_{n}.safetensors", n, ts) for n, ts in ordered.items()]
        return plans + [ShardPlan(f"{folder}/{NON_BLOCK}.safetensors", None, rest)]
    everything = [t for ts in ordered.values() for t in ts] + rest
    return [ShardPlan(f"{folder}/model.safetensors", None, everything)]


def manifest_entries(plans: list[ShardPlan], phases: tuple[str, ...],
                     shas: dict[str, str]) -> tuple[list[ShardEntry], list[BlockEntry]]:  # fmt: skip
    """Shard and block entries of the manifest, from the plans and the written files' hashes."""
    shards, blocks = [], {}
    for plan in plans:
        by_name = {t.name: t for t in plan.tensors}
        entries = []
        for pt in plan.layout.real_tensors():
            t = by_name[pt.name]
            entries.append(TensorEntry(
                name=t.name, dtype=t.dtype, shape=list(t.shape), offset=pt.offset, length=pt.length,
                block=t.spec.block, phase=t.spec.phase, scale=t.name + SCALE_SUFFIX if t.role == "qweight" else None,
                quantized=t.role == "qweight",
            ))  # fmt: skip
        shards.append(ShardEntry(path=plan.path, size=plan.layout.file_size, sha256=shas[plan.path],
                                 block=plan.block, tensors=entries))  # fmt: skip
        for group, (offset, length) in plan.layout.groups.items():
            if group == NON_BLOCK:
                continue
            n_str, phase = group.split("/", 1)
            blk = blocks.setdefault(int(n_str), BlockEntry(index=int(n_str), shard=plan.path, offset=offset, length=0))
            blk.phases.append(RangeEntry(name=phase, offset=offset, length=length))
    for blk in blocks.values():
        rank = {p: i for i, p in enumerate(phases)}
        blk.phases.sort(key=lambda r: rank[r.name])
        blk.offset = blk.phases[0].offset
        blk.length = sum(r.length for r in blk.phases)
    return shards, [blocks[n] for n in sorted(blocks)]
