"""`wanpack plan`: how a pack would be streamed under VRAM/RAM budgets, or why it cannot be."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from wanpack.commands._common import BUDGET_HELP, check_at_least, check_choice, guarded, parse_budget
from wanpack.output import human_bytes, out, print_json

CACHE_MODES = ("auto", "all", "none")


def resolve_budgets(vram: str | None, ram: str | None) -> tuple[int, int]:
    """Parse the flags; an unset budget defaults to this machine's real free GPU memory / available RAM."""
    from wanpack.errors import UsageError
    from wanpack.runtime.stream.planner import detect_budgets

    free_vram, free_ram = detect_budgets() if vram is None or ram is None else (None, None)
    vram_b = parse_budget("--vram-budget", vram) if vram is not None else free_vram
    ram_b = parse_budget("--ram-budget", ram) if ram is not None else free_ram
    if vram_b is None:
        raise UsageError("no CUDA GPU found to read free memory from - pass --vram-budget, e.g. 8GiB")
    if ram_b is None:
        raise UsageError("cannot read available RAM (/proc/meminfo) - pass --ram-budget, e.g. 16GiB")
    return vram_b, ram_b


@guarded
def plan(
    pack: Path = typer.Argument(..., help="Pack folder."),
    vram_budget: str = typer.Option(None, "--vram-budget", help=f"GPU memory to use, {BUDGET_HELP} (default: free "
                                    "now)."),  # fmt: skip
    ram_budget: str = typer.Option(None, "--ram-budget", help=f"Host RAM to use, {BUDGET_HELP} (default: "
                                   "available)."),  # fmt: skip
    resolution: str = typer.Option("480p", "--resolution", "-r", help="480p, 720p or WxH (e.g. 832x480)."),
    frames: int = typer.Option(81, "--frames", "-f", help="Video frames (4n+1)."),
    granularity: str = typer.Option(None, "--granularity", help="Force model | block | phase (default: choose)."),
    cache: str = typer.Option("auto", "--cache", help="Host cache: auto (what RAM allows), all, or none."),
    disk_workers: int = typer.Option(None, "--disk-workers", help="Disk reader threads (default: by unit size)."),
    component: str = typer.Option("dit", "--component", help="Component to plan: dit, the only one the planner "
                                  "sizes (T5 and CLIP run once, streamed with fixed settings)."),  # fmt: skip
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Choose granularity, slots, prefetch depth, host cache and activation chunks for a pack under budgets.

    Refuses (exit 2) with the minimum memory it would need when the budgets are too small.

    Examples:
      wanpack plan ./t2v-14b-int8 --vram-budget 8GiB --ram-budget 16GiB --resolution 480p --frames 81
      wanpack plan ./t2v-14b-int8 --vram-budget 6GiB --resolution 1280x720 --json
    """
    from wanpack.runtime.pack import GRANULARITIES, PackComponent
    from wanpack.runtime.stream.planner import parse_resolution
    from wanpack.runtime.stream.planner import plan as make_plan

    check_choice("--component", component, ("dit",))
    check_choice("--granularity", granularity, GRANULARITIES)
    check_choice("--cache", cache, CACHE_MODES)
    check_at_least("--disk-workers", disk_workers, 1)
    width, height = parse_resolution(resolution)
    comp = PackComponent(pack, component)  # the pack is checked before the budgets
    vram_b, ram_b = resolve_budgets(vram_budget, ram_budget)
    result = make_plan(comp, vram_budget=vram_b, ram_budget=ram_b, width=width,
                       height=height, frames=frames, granularity=granularity, disk_workers=disk_workers,
                       cache=cache)  # fmt: skip
    if json_out:
        print_json(result.to_dict())
        return
    table = Table(title=f"plan for {escape(str(pack))} ({component}, {width}x{height}, {frames} frames, {result.tokens} tokens)")
    table.add_column("setting")
    table.add_column("value")
    rows = [
        ("granularity", result.granularity),
        ("device slots x size", f"{result.device_slots} x {human_bytes(result.unit_bytes)}"),
        ("prefetch depth", str(result.prefetch)),
        ("host ring slots", str(result.host_slots)),
        ("host cache", f"{result.cache_policy} ({len(result.cache_units)} units, {human_bytes(result.cache_bytes)})"),
        ("disk workers", str(result.disk_workers)),
        ("activation chunks", f"ffn {result.ffn_chunk} tokens, rope/norm {result.rope_chunk} tokens"),
        ("activations (est.)", human_bytes(result.activation_bytes)),
        ("non-block weights", human_bytes(result.non_block_bytes)),
        ("peak VRAM (pred.)", f"{human_bytes(result.peak_vram)} of {human_bytes(result.vram_budget)}"),
        ("peak RSS (pred.)", f"{human_bytes(result.peak_rss)} of {human_bytes(result.ram_budget)}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)
    for note in result.notes:
        out.print(f"- {note}")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
