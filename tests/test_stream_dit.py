"""The real DiT streamed through the engine equals the resident runner bit-exactly (CPU, tiny configs, real packs).

Packs come from the project's converter; the resident reference loads every tensor with the safetensors library and
calls ``dit.forward``; the streamed run calls the same phase functions on slot views at each granularity.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

dit = pytest.importorskip("wanpack.runtime.models.dit", reason="the DiT (runtime/models/dit.py) is not merged yet")

from wanpack.convert.converter import ConvertOptions, convert_checkpoint  # noqa: E402
from wanpack.convert.synth import synth_checkpoint  # noqa: E402
from wanpack.manifests.arch import config_from_dict  # noqa: E402
from wanpack.runtime.pack import PackComponent  # noqa: E402
from wanpack.runtime.stream.dit_stream import streamed_forward  # noqa: E402
from wanpack.runtime.stream.engine import StreamEngine, StreamOptions  # noqa: E402


@pytest.fixture(scope="module", params=[("wan2.1-t2v-14b", "int8", True), ("wan2.1-i2v-14b", "fp8", False)],
                ids=["t2v-int8-by-block", "i2v-fp8-single"])  # fmt: skip
def pack(request, tmp_path_factory) -> Path:
    arch, quant, by_block = request.param
    root = tmp_path_factory.mktemp("dit_pack")
    synth_checkpoint(root / "src", arch, layers=3, dim_scale="tiny")
    convert_checkpoint(root / "src", root / "pack", ConvertOptions(arch=arch, quant=quant, save_by_block=by_block))
    return root / "pack"


def inputs(cfg):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn((1, 16, 3, 8, 12), generator=gen)
    text = torch.randn((1, 7, cfg.text_dim), generator=gen)
    extra = {}
    if cfg.model_type == "i2v":
        extra = {"clip": torch.randn((1, cfg.image_tokens, cfg.image_dim), generator=gen),
                 "y": torch.randn((1, 20, 3, 8, 12), generator=gen)}  # fmt: skip
    return latents, torch.tensor([700.0]), text, extra


def resident_weights(pack_dir: Path) -> dict[str, torch.Tensor]:
    comp = PackComponent(pack_dir).entry
    out = {}
    for shard in comp.shards:
        with safe_open(pack_dir / shard.path, framework="pt") as f:
            for t in shard.tensors:
                out[t.name] = f.get_tensor(t.name)
    return out


@pytest.mark.parametrize(("gran", "prefetch", "cache"), [("model", 0, False), ("block", 1, False), ("block", 2, True),
                                                         ("phase", 1, True), ("phase", 3, False)])  # fmt: skip
def test_streamed_dit_equals_resident(pack, gran, prefetch, cache):
    comp = PackComponent(pack)
    cfg = config_from_dict(comp.entry.config)
    opts = dit.DiTOptions(dtype=torch.float32, chunk_tokens=32)
    latents, t, text, extra = inputs(cfg)
    ref = dit.forward(resident_weights(pack), cfg, latents, t, text, opts=opts, **extra)
    n = len(comp.units(gran))
    options = StreamOptions(granularity=gran, prefetch=prefetch, device_slots=prefetch + 1, disk_workers=2,
                            cache_units=list(range(n)) if cache else [])  # fmt: skip
    with StreamEngine(comp, options) as eng:
        kv: dict = {}
        for _ in range(2):  # the second step reuses the cached cross K/V, as sampling does
            out = streamed_forward(eng, cfg, latents, t, text, kv_cache=kv, opts=opts, **extra)
            assert torch.equal(out, ref)
