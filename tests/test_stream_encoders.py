"""T5 streamed block by block (or phase by phase) through the engine equals the resident encoder bit-exactly (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from wanpack.convert.converter import ConvertOptions, convert_checkpoint
from wanpack.convert.synth import synth_checkpoint
from wanpack.manifests.arch import config_from_dict
from wanpack.runtime.models.t5 import T5Encoder
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.stream.engine import StreamEngine, StreamOptions


@pytest.fixture(scope="module")
def t5_pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t5")
    synth_checkpoint(root / "src", "wan2.1-t2v-1.3b", dim_scale="tiny", components=("t5",))
    convert_checkpoint(root / "src", root / "pack", ConvertOptions(quant="int8", components=("t5",),
                                                                  arch="wan2.1-t2v-1.3b"))  # fmt: skip
    return root / "pack"


@pytest.mark.parametrize(("gran", "prefetch"), [("model", 0), ("block", 1), ("phase", 1), ("phase", 2)])
def test_streamed_t5_equals_resident(t5_pack, gran, prefetch):
    comp = PackComponent(t5_pack, "t5")
    enc = T5Encoder(config_from_dict(comp.entry.config), dtype=torch.float32)
    weights = {}
    for shard in comp.entry.shards:
        with safe_open(t5_pack / shard.path, framework="pt") as f:
            weights.update({t.name: f.get_tensor(t.name) for t in shard.tensors})
    ids = torch.randint(1, enc.cfg.vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ref = enc(weights, ids, mask)
    with StreamEngine(comp, StreamOptions(granularity=gran, prefetch=prefetch, device_slots=prefetch + 1)) as eng:
        for _ in range(2):
            x, ctx = enc.embed(eng.resident, ids, mask)
            for unit, w in eng.forward():
                for phase in unit.phases:
                    x = enc.phase(phase)(w, x, ctx)
            out = enc.finish(eng.resident, x, ctx)
            assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_planner_refuses_encoders(t5_pack):
    from wanpack.errors import UsageError
    from wanpack.runtime.stream.planner import plan

    with pytest.raises(UsageError, match="dit component"):
        plan(PackComponent(t5_pack, "t5"), vram_budget=1 << 33, ram_budget=1 << 34, width=832, height=480, frames=81)
