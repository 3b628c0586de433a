"""Planner decisions against hand-computed budgets, and the `wanpack plan` / `wanpack bench` commands (CPU)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from stream_packs import make_pack
from typer.testing import CliRunner

from wanpack.cli import app
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.stream import planner
from wanpack.runtime.stream.planner import BudgetError, GiB, MiB, parse_resolution, parse_size, plan

runner = CliRunner()


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return make_pack(tmp_path_factory.mktemp("plan") / "p", layers=6)


def need(pc: PackComponent, gran: str, k: int, tokens: int, chunk: int) -> int:
    """The documented VRAM formula, written out independently of the planner's loop."""
    cfg = pc.entry.config
    d, f, hd = cfg["dim"], cfg["ffn_dim"], cfg["dim"] // cfg["num_heads"]
    chunk = min(chunk, tokens)
    act = (tokens * d * (4 + 4) + tokens * hd * 4 + chunk * max(32 * d, 16 * d + 4 * f)
           + pc.num_blocks * 2 * 512 * d * 2)  # fmt: skip
    unit = pc.max_unit_bytes("block" if gran == "model" else gran)
    return pc.non_block_bytes() + k * unit + int(act * 1.1)


def test_parse_size_and_resolution():
    assert parse_size("8GiB") == 8 * GiB == parse_size("8G") == parse_size("8gb")
    assert parse_size("512MiB") == 512 * MiB and parse_size(1234) == 1234
    assert parse_resolution("480p") == (832, 480) and parse_resolution("1280x720") == (1280, 720)
    with pytest.raises(planner.UsageError):
        parse_size("eight gigs")
    with pytest.raises(planner.UsageError):
        parse_resolution("833x480")


def test_tokens_match_wan_sequence_lengths(pack):
    pc = PackComponent(pack)
    assert plan(pc, vram_budget=64 * GiB, ram_budget=64 * GiB, width=832, height=480, frames=81).tokens == 32760
    assert plan(pc, vram_budget=64 * GiB, ram_budget=64 * GiB, width=1280, height=720, frames=81).tokens == 75600


def test_granularity_steps_down_as_vram_shrinks(pack):
    pc = PackComponent(pack)
    tokens = 32760
    args = {"ram_budget": 64 * GiB, "width": 832, "height": 480, "frames": 81}
    model_need = need(pc, "model", 6, tokens, planner.MAX_CHUNK)
    p = plan(pc, vram_budget=model_need, **args)
    assert (p.granularity, p.ffn_chunk) == ("model", planner.MAX_CHUNK)
    short = need(pc, "model", 6, tokens, planner.PREFERRED_CHUNK) - 1  # resident only with too-small chunks
    p = plan(pc, vram_budget=short, **args)
    assert (p.granularity, p.device_slots, p.prefetch) == ("block", 3, 2)
    assert p.peak_vram == need(pc, "block", 3, tokens, p.ffn_chunk) <= short
    phase_min = need(pc, "phase", 2, tokens, planner.MIN_CHUNK)
    p = plan(pc, vram_budget=phase_min, **args)
    assert (p.granularity, p.device_slots, p.ffn_chunk) == ("phase", 2, planner.MIN_CHUNK)
    with pytest.raises(BudgetError, match=f"{phase_min / GiB:.2f} GiB"):
        plan(pc, vram_budget=phase_min - 1, **args)


def test_host_cache_all_subset_none(pack):
    pc = PackComponent(pack)
    args = {"vram_budget": need(pc, "block", 3, 32760, 8192), "width": 832, "height": 480, "frames": 81,
            "granularity": "block"}
    units = pc.units("block")
    unit = max(u.length for u in units)
    base = planner.BASE_RSS + 4 * unit + pc.non_block_bytes()  # ring of prefetch + 2 = 4 slots
    p = plan(pc, ram_budget=base + sum(u.length for u in units), **args)
    assert p.cache_policy == "all" and p.cache_units == list(range(6))
    p = plan(pc, ram_budget=base + 3 * unit, **args)
    assert p.cache_policy == "subset" and p.cache_units == [0, 2, 4]  # spread, not the first three
    assert p.peak_rss == base + 3 * unit
    p = plan(pc, ram_budget=base, **args)
    assert p.cache_policy == "none" and p.cache_units == []
    with pytest.raises(BudgetError, match="RAM"):
        plan(pc, ram_budget=base - 1, **args)
    assert plan(pc, ram_budget=64 * GiB, cache="none", **args).cache_policy == "none"


def test_plan_options_drive_the_engine(pack):
    from wanpack.runtime.stream.engine import StreamEngine

    pc = PackComponent(pack)
    p = plan(pc, vram_budget=need(pc, "block", 2, 32760, planner.PREFERRED_CHUNK), ram_budget=64 * GiB, width=832,
             height=480, frames=81, granularity="block")  # fmt: skip
    with StreamEngine(pc, p.options(disk_workers=2)) as eng:
        assert eng.k == p.device_slots == 2 and eng.prefetch == 1
        assert sum(1 for _ in eng.forward()) == 6


def test_plan_command_table_json_and_refusal(pack):
    res = runner.invoke(app, ["plan", str(pack), "--vram-budget", "8GiB", "--ram-budget", "16GiB",
                              "--resolution", "480p", "--frames", "81"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "granularity" in res.output and "peak VRAM" in res.output
    res = runner.invoke(app, ["plan", str(pack), "--vram-budget", "8GiB", "--ram-budget", "16GiB", "--json",
                              "-r", "720p", "--granularity", "phase"])  # fmt: skip
    data = json.loads(res.stdout)
    assert data["granularity"] == "phase" and data["tokens"] == 75600
    res = runner.invoke(app, ["plan", str(pack), "--vram-budget", "1MiB", "--ram-budget", "16GiB"])
    assert res.exit_code == 2
    assert "needs at least" in res.output


def test_bench_command_runs_on_cpu(pack, tmp_path):
    timeline = tmp_path / "tl.json"
    res = runner.invoke(app, ["bench", str(pack), "--vram-budget", "1GiB", "--ram-budget", "8GiB", "--latent",
                              "1x4x4", "--small-latent", "none", "--repeats", "1", "--model", "proxy",
                              "--timeline", str(timeline), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    runs = data["runs"]
    assert set(runs) == {"resident", "streamed_cached", "streamed_disk"}
    units = PackComponent(pack).units("block")
    n = sum(u.length for u in units)
    assert runs["resident"]["h2d_bytes_per_forward"] == 0  # resident moves nothing after its first forward
    assert runs["streamed_disk"]["disk_bytes_per_forward"] > 0 and runs["streamed_cached"]["disk_bytes_per_forward"] == 0
    # every unit is copied once per forward; the counting window starts and ends between forwards while the engine
    # may already have copied up to `prefetch` units of the next one (as many as its reads had finished), so the
    # average over the 2 counted forwards can be off by at most prefetch * largest unit / 2
    disk = runs["streamed_disk"]
    slack = disk["prefetch"] * max(u.length for u in units) / 2
    assert abs(disk["h2d_bytes_per_forward"] - n) <= slack, (disk["h2d_bytes_per_forward"], n, slack)
    rows = json.loads(timeline.read_text())
    assert {r["kind"] for r in rows} == {"copy", "compute"}


def test_activation_model_matches_the_dit_accounting():
    dit = pytest.importorskip("wanpack.runtime.models.dit", reason="the DiT is not merged yet")
    from wanpack.manifests.arch import config_to_dict, dit_config

    for arch in ("wan2.1-t2v-14b", "wan2.1-i2v-14b"):
        cfg = dit_config(arch)
        for latent in ((21, 60, 104), (21, 90, 160)):
            for quantized in (False, True):  # the sage kernel's one-byte K/V copies
                parts = dit.activation_memory(cfg, latent, opts=dit.DiTOptions(chunk_tokens=4096),
                                              quantized_attention=quantized)  # fmt: skip
                ours = planner.activation_bytes(config_to_dict(cfg), parts["tokens"], 4096, cfg.num_layers, quantized)
                theirs = parts["peak"] + (cfg.num_layers - 1) * parts["cross_kv"]  # the cache holds every block's K/V
                assert abs(ours - theirs) <= 0.01 * theirs
                assert parts["quantized_kv"] == (2 * parts["tokens"] * cfg.dim if quantized else 0)


def test_quantized_attention_needs_its_kv_copies_counted(pack):
    """With the sage kernel the plan reserves 2*L*d bytes more (x FRAGMENTATION) for its int8 K and fp8 V; a budget
    that fits only without them moves to the next plan down."""
    pc = PackComponent(pack, "dit")
    d = pc.entry.config["dim"]
    base = plan(pc, vram_budget=64 * GiB, ram_budget=64 * GiB, width=832, height=480, frames=81, granularity="block")
    quant = plan(pc, vram_budget=64 * GiB, ram_budget=64 * GiB, width=832, height=480, frames=81, granularity="block",
                 quantized_attention=True)  # fmt: skip
    assert quant.activation_bytes - base.activation_bytes == 2 * base.tokens * d
    assert quant.peak_vram - base.peak_vram == int(quant.activation_bytes * 1.1) - int(base.activation_bytes * 1.1)
    tight = plan(pc, vram_budget=base.peak_vram, ram_budget=64 * GiB, width=832, height=480, frames=81,
                 granularity="block", quantized_attention=True)  # fmt: skip
    assert (tight.device_slots, tight.ffn_chunk) < (base.device_slots, base.ffn_chunk) and tight.peak_vram <= base.peak_vram


def test_may_quantize_follows_the_forced_backend_and_auto(monkeypatch):
    from wanpack.runtime.ops import attention as attn

    monkeypatch.delenv(attn.SAGE_AUTO_ENV, raising=False)
    try:
        assert not attn.may_quantize("cpu")  # sage needs CUDA
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        runs_here = dataclasses.replace(attn.BACKENDS["sage"], unavailable=lambda dev: None)  # as on an sm89+ card
        monkeypatch.setitem(attn.BACKENDS, "sage", runs_here)
        assert attn.may_quantize(torch.device("cuda", 0))
        monkeypatch.setenv(attn.SAGE_AUTO_ENV, "0")
        assert not attn.may_quantize(torch.device("cuda", 0))
        attn.set_attn_backend("sage")
        assert attn.may_quantize(torch.device("cuda", 0))
        attn.set_attn_backend("cudnn")
        assert not attn.may_quantize(torch.device("cuda", 0))
    finally:
        monkeypatch.delenv(attn.SAGE_AUTO_ENV, raising=False)
        attn.set_attn_backend(None)


def _one_line_usage_error(res, fragment: str) -> None:
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert lines[-1].startswith("error:") and fragment in lines[-1], res.output


def test_budget_flags_are_size_strings_and_bare_numbers_are_gib(pack):
    res = runner.invoke(app, ["plan", str(pack), "--vram-budget", "8", "--ram-budget", "16", "--json"])
    assert res.exit_code == 0, res.output  # was: 8 bytes, "needs at least"
    data = json.loads(res.stdout)
    assert (data["vram_budget"], data["ram_budget"]) == (8 * GiB, 16 * GiB)
    res = runner.invoke(app, ["plan", str(pack), "--vram-budget", "8192MiB", "--ram-budget", "16GiB", "--json"])
    assert json.loads(res.stdout)["vram_budget"] == 8 * GiB
    _one_line_usage_error(runner.invoke(app, ["plan", str(pack), "--vram-budget", "8 gigs", "--ram-budget", "16"]),
                          "--vram-budget '8 gigs'")  # fmt: skip
    _one_line_usage_error(runner.invoke(app, ["plan", str(pack), "--vram-budget", "0", "--ram-budget", "16"]),
                          "--vram-budget must be more than 0")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["plan", "--granularity", "bogus"], "--granularity 'bogus'"),
        (["plan", "--cache", "bogus"], "--cache 'bogus'"),
        (["plan", "--component", "t5"], "--component 't5'"),
        (["bench", "--granularity", "bogus"], "--granularity 'bogus'"),
        (["bench", "--model", "bogus"], "--model 'bogus'"),
        (["bench", "--repeats", "0"], "--repeats must be at least 1"),
        (["bench", "--disk-workers", "0"], "--disk-workers must be at least 1"),
        (["bench", "--timeline", "MISSING/t.json"], "choose another --timeline"),
        (["bench", "--dtype", "fp64"], "unknown dtype"),
    ],
)  # fmt: skip
def test_plan_and_bench_refuse_bad_flags_before_any_work(pack, tmp_path, monkeypatch, args, fragment):
    from wanpack.runtime.stream import bench

    def must_not_run(*a, **k):
        raise AssertionError("the benchmark started before the flags were checked")

    monkeypatch.setattr(bench, "run_suite", must_not_run)
    cmd, *rest = args
    rest = [a.replace("MISSING", str(tmp_path / "missing")) for a in rest]
    res = runner.invoke(app, [cmd, str(pack), "--vram-budget", "8GiB", "--ram-budget", "8GiB", *rest])
    _one_line_usage_error(res, fragment)


def test_plan_component_help_says_what_it_accepts():
    res = runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "200"})
    assert "dit, the only one the planner sizes" in res.output
