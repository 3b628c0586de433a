"""`wanpack bench`: resident vs streamed forwards of a pack, with every rate next to its measured ceiling."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from wanpack.commands._common import BUDGET_HELP, check_at_least, check_choice, guarded
from wanpack.output import human_bytes, log, out, print_json


def _latent(text: str | None, resolution: str, frames: int) -> tuple[int, int, int]:
    from wanpack.errors import UsageError
    from wanpack.runtime.stream.planner import latent_shape, parse_resolution

    if text:
        try:
            f, h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise UsageError(f"cannot read latent {text!r} - write FxHxW, e.g. 21x60x104") from None
        return f, h, w
    w, h = parse_resolution(resolution)
    return latent_shape(w, h, frames)


@guarded
def bench(
    pack: Path = typer.Argument(..., help="Pack folder."),
    resolution: str = typer.Option("480p", "--resolution", "-r", help="480p, 720p or WxH."),
    frames: int = typer.Option(81, "--frames", "-f", help="Video frames (4n+1)."),
    latent: str = typer.Option(None, "--latent", help="Latent FxHxW instead of resolution/frames (e.g. 21x60x104)."),
    small_latent: str = typer.Option("5x24x40", "--small-latent", help="Transfer-bound latent; 'none' to skip."),
    vram_budget: str = typer.Option(None, "--vram-budget", help=f"VRAM cap for streamed runs, {BUDGET_HELP} "
                                    "(default: free now)."),  # fmt: skip
    ram_budget: str = typer.Option(None, "--ram-budget", help=f"RAM budget, {BUDGET_HELP} (default: available)."),
    granularity: str = typer.Option("block", "--granularity", help="block or phase for the streamed runs."),
    repeats: int = typer.Option(3, "--repeats", help="Timed forwards per configuration (after one warm-up)."),
    model: str = typer.Option("auto", "--model", help="auto (the DiT if installed), dit, or proxy (GEMMs only)."),
    dtype: str = typer.Option(None, "--dtype", help="BF16 or FP16 (default: $DTYPE or BF16)."),
    graph_mode: bool = typer.Option(None, "--graph-mode/--no-graph-mode", help="CUDA graphs (default: "
                                    "$ENABLE_GRAPH_MODE)."),  # fmt: skip
    alloc_conf: str = typer.Option(None, "--alloc-conf", help="PYTORCH_CUDA_ALLOC_CONF (default: "
                                   "expandable_segments:True unless set)."),  # fmt: skip
    disk_workers: int = typer.Option(None, "--disk-workers", help="Disk reader threads (default: planner)."),
    no_resident: bool = typer.Option(False, "--no-resident", help="Skip the resident baseline."),
    no_disk: bool = typer.Option(False, "--no-disk", help="Skip the host-cache-off (disk) run."),
    timeline: Path = typer.Option(None, "--timeline", help="Write the per-unit copy/compute timeline JSON here."),
    json_out: bool = typer.Option(False, "--json", help="Print all results as JSON."),
) -> None:
    """Time a pack's DiT resident and streamed (host cache on and off) on random latents, in one process.

    Examples:
      wanpack bench ./t2v-14b-int8 --vram-budget 8GiB
      wanpack bench ./t2v-14b-int8 --latent 21x90x160 --no-disk --json > bench.json
    """
    from wanpack.runtime.stream import env

    env.apply_alloc_conf(alloc_conf)  # before torch touches CUDA
    from wanpack.commands.plan import resolve_budgets
    from wanpack.manifests.format import read_manifest
    from wanpack.runtime.stream.bench import run_suite
    from wanpack.runtime.video import check_output_path

    # everything the user gave is checked before the first timed forward
    check_choice("--granularity", granularity, ("block", "phase"))
    check_choice("--model", model, ("auto", "dit", "proxy"))
    check_at_least("--repeats", repeats, 1)
    check_at_least("--disk-workers", disk_workers, 1)
    compute_dtype = env.compute_dtype(dtype)
    if timeline is not None:
        check_output_path(timeline, "--timeline")
    read_manifest(pack)
    main_latent = _latent(latent, resolution, frames)
    small = None if small_latent.lower() == "none" else _latent(small_latent, resolution, frames)
    vram_b, ram_b = resolve_budgets(vram_budget, ram_budget)
    result = run_suite(pack, latent=main_latent, small_latent=small, vram_budget=vram_b,
                       ram_budget=ram_b, repeats=repeats, model=model, dtype=compute_dtype,
                       graph=env.graph_mode(graph_mode), timeline=timeline is not None, granularity=granularity,
                       disk_workers=disk_workers, resident=not no_resident, disk=not no_disk, log=log)  # fmt: skip
    if timeline is not None:
        timeline.write_text(json.dumps(result["runs"]["streamed_cached"].pop("timeline", []), indent=1) + "\n")
    if json_out:
        print_json(result)
        return
    print_table(result)


def print_table(result: dict) -> None:
    runs = result["runs"]
    base = runs.get("resident", {}).get("sec_per_forward")
    small_base = runs.get("small_resident", {}).get("sec_per_forward")
    table = Table(title=f"{escape(str(result['pack']))} on {result['device']} ({result['date']})")
    for col in ("run", "s/forward", "vs resident", "disk GB/s", "H2D GB/s", "peak VRAM", "peak RSS"):
        table.add_column(col)
    peak_h2d = result.get("h2d_peak_gbps")
    for name, r in runs.items():
        ref = small_base if name.startswith("small") else base
        ratio = f"{r['sec_per_forward'] / ref:.3f}x" if ref and "resident" not in name else "-"
        disk = f"{r['disk_gbps']:.2f} / {result['disk_peak_gbps']:.2f}" if r["disk_gbps"] else "-"
        h2d = f"{r['h2d_gbps']:.1f} / {peak_h2d:.1f}" if r["h2d_gbps"] and peak_h2d else "-"
        vram = human_bytes(r["peak_vram_reserved"]) if "peak_vram_reserved" in r else "-"
        table.add_row(name, f"{r['sec_per_forward']:.3f}", ratio, disk, h2d, vram, human_bytes(r["peak_rss"]))
    out.print(table)
    out.print("disk and H2D columns: achieved / ceiling measured in this run (raw O_DIRECT read, pinned memcpy)")
    for k, v in result.get("summary", {}).items():
        out.print(f"{k}: {v:.3f}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
