"""The run planner (runtime/run_plan.py): offload chosen from budgets unless set, explicit settings honored (CPU).

GPU plans are computed here too: plan_run only reads the manifest and the budgets, so a CUDA device object with
explicit budgets exercises every GPU decision without a GPU. Budgets are derived from the pack's own sizes (and the
planner's documented reserves), so the cases sit just above or below each threshold.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wanpack.convert.converter import ConvertOptions, convert_checkpoint
from wanpack.convert.synth import synth_checkpoint
from wanpack.errors import UsageError
from wanpack.manifests.format import read_manifest
from wanpack.manifests.run_config import resolve_run_config
from wanpack.runtime import run_plan
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.stream import planner

CUDA = torch.device("cuda")  # never initialized: plan_run does not touch the device when budgets are given
GiB = 1 << 30
SIZE = {"width": 832, "height": 480, "task": "t2v", "batch": 1}


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run_plan")
    synth_checkpoint(root / "src", "wan2.1-t2v-14b", layers=3, dim_scale="tiny", components=("dit", "t5", "vae"))
    convert_checkpoint(root / "src", root / "pack", ConvertOptions(quant="int8", components=("all",)))
    return root / "pack"


def plan_for(pack: Path, jobs: int = 1, device: torch.device = CUDA, **settings) -> run_plan.RunPlan:
    cfg = resolve_run_config("distill-4step", settings or None)
    return run_plan.plan_run(pack, read_manifest(pack), cfg, device=device, jobs=jobs, **SIZE)


def dit_need(pack: Path, granularity: str, chunk: int) -> int:
    """Peak VRAM the DiT planner predicts for one granularity and activation chunk."""
    p = planner.plan(PackComponent(pack), vram_budget=1 << 50, ram_budget=1 << 50, width=832, height=480, frames=81,
                     granularity=granularity, chunk=chunk)  # fmt: skip
    return p.peak_vram


def gib(nbytes: int) -> float:
    return nbytes / GiB


def test_nothing_set_and_room_everywhere_keeps_the_dit_whole_and_reads_through_the_page_cache(pack):
    p = plan_for(pack, vram_budget_gib=64, ram_budget_gib=64)
    assert p.explicit == {} and p.dit.granularity == "model"
    assert p.read_mode == "cached" and p.dit_options.mapped and not p.dit_options.direct_io
    t5 = p.encoders["t5"]
    assert (t5.device, t5.granularity, t5.device_slots, t5.cache) == ("cuda", "block", 3, "none")
    assert p.encoder_options("t5").pin_mapped  # read once, still page-locked in place: DMA beats a pageable copy
    assert p.vram_budget == 64 * GiB - run_plan.CONTEXT_RESERVE  # the budget covers the CUDA context too


def test_a_smaller_vram_budget_makes_the_planner_stream(pack):
    budget = run_plan.CONTEXT_RESERVE + dit_need(pack, "model", planner.PREFERRED_CHUNK) - 1  # whole only with small chunks
    p = plan_for(pack, vram_budget_gib=gib(budget), ram_budget_gib=64)
    # 3 blocks: the 3-slot block plan needs what the whole model needs, so the 2-slot one is the fastest that fits
    assert p.dit.granularity == "block" and p.dit.device_slots == 2 and p.dit.cache_policy == "all"
    assert p.dit.peak_vram <= budget - run_plan.CONTEXT_RESERVE


def test_explicit_settings_are_honored_and_recorded(pack):
    p = plan_for(pack, vram_budget_gib=64, ram_budget_gib=64, offload_granularity="phase", lazy_load=True,
                 read_mode="direct", t5_cpu_offload=False)  # fmt: skip
    assert p.explicit == {"offload_granularity": "phase", "lazy_load": True, "read_mode": "direct",
                          "t5_cpu_offload": False}  # fmt: skip
    assert p.dit.granularity == "phase" and p.dit.cache_policy == "none"
    assert p.read_mode == "direct" and p.dit_options.direct_io and not p.dit_options.mapped
    assert p.encoders["t5"].granularity == "model" and p.encoders["t5"].reason == "set explicitly"
    assert p.to_dict()["explicit"] == p.explicit  # what the sidecar records


def test_cpu_offload_alone_keeps_the_dit_streamed_even_when_it_would_fit(pack):
    p = plan_for(pack, vram_budget_gib=64, ram_budget_gib=64, cpu_offload=True)
    assert p.dit.granularity == "block"
    assert plan_for(pack, vram_budget_gib=64, ram_budget_gib=64, cpu_offload=False).dit.granularity == "model"
    with pytest.raises(UsageError, match="cpu_offload is on but offload_granularity is 'model'"):
        plan_for(pack, vram_budget_gib=64, ram_budget_gib=64, cpu_offload=True, offload_granularity="model")


def test_a_ram_budget_that_cannot_also_cache_the_reads_goes_direct(pack):
    roomy = plan_for(pack, vram_budget_gib=64, ram_budget_gib=64)
    ring = (run_plan.ENCODER_SLOTS + 1) * PackComponent(pack, "t5").max_unit_bytes("block")
    enough = roomy.dit.peak_rss + ring + roomy.bytes_per_run  # the process, the encoder ring, every byte read cached
    assert plan_for(pack, vram_budget_gib=64, ram_budget_gib=gib(enough)).read_mode == "cached"
    p = plan_for(pack, vram_budget_gib=64, ram_budget_gib=gib(enough - 4096))
    assert p.read_mode == "direct" and "O_DIRECT" in p.read_reason
    assert roomy.read_mode == "cached" and "next run reads RAM" in roomy.read_reason


def test_the_t5_moves_to_the_cpu_only_when_two_of_its_blocks_do_not_fit_beside_the_dit(pack):
    comp = PackComponent(pack, "t5")
    unit = comp.max_unit_bytes("block")
    cfg = resolve_run_config("distill-4step")

    def t5(vram_left: int):
        return run_plan._encoder_plan("t5", comp, cfg, vram_left, 64 * GiB, jobs=1)

    room = run_plan.ENCODER_WORKSPACE
    assert (t5(room + 3 * unit).device, t5(room + 3 * unit).device_slots) == ("cuda", 3)
    assert (t5(room + 2 * unit).device, t5(room + 2 * unit).device_slots) == ("cuda", 2)
    cpu = t5(room + 2 * unit - 1)
    assert cpu.device == "cpu" and "cannot hold two t5 blocks" in cpu.reason
    explicit = run_plan._encoder_plan("t5", comp, resolve_run_config(config={"t5_cpu_offload": False}),
                                      room + 2 * unit, 64 * GiB, jobs=1)  # fmt: skip
    assert explicit.granularity == "model"  # asked for whole, and it fits
    with pytest.raises(planner.BudgetError, match="t5_cpu_offload false needs"):
        run_plan._encoder_plan("t5", comp, resolve_run_config(config={"t5_cpu_offload": False}), unit, 64 * GiB, 1)


def test_several_jobs_keep_the_encoder_blocks_and_pin_them(pack):
    p = plan_for(pack, jobs=5, vram_budget_gib=64, ram_budget_gib=64)
    assert p.encoders["t5"].cache == "all" and p.encoder_options("t5").pin_mapped


def test_cpu_runs_stream_block_by_block_through_mappings(pack):
    p = plan_for(pack, device=torch.device("cpu"))
    assert p.device == "cpu" and p.dit is None and p.dit_options.granularity == "block" and p.dit_options.mapped
    assert plan_for(pack, device=torch.device("cpu"), read_mode="direct").dit_options.direct_io


def test_a_vram_budget_that_cannot_hold_the_dit_is_refused_with_the_minimum(pack):
    with pytest.raises(planner.BudgetError, match="needs at least"):
        plan_for(pack, vram_budget_gib=gib(run_plan.CONTEXT_RESERVE + 1024), ram_budget_gib=64)


def test_a_vram_budget_below_the_cuda_context_is_refused_in_words():
    with pytest.raises(planner.BudgetError, match="does not even hold the CUDA context"):
        run_plan.usable_vram(0.5, None)
    assert run_plan.usable_vram(8, None) == 8 * GiB - run_plan.CONTEXT_RESERVE
