"""`wanpack inspect`: what a pack holds, from its manifest (reads no weights)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from wanpack.commands._common import guarded
from wanpack.output import human_bytes, out, print_json


@guarded
def inspect(
    pack: Path = typer.Argument(..., help="Pack folder."),
    blocks: bool = typer.Option(False, "--blocks", help="List every shard with its phase ranges."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Show a pack's components, architecture, quantization, shards and phase ranges.

    Examples:
      wanpack inspect ./t2v-14b-int8
      wanpack inspect ./t2v-14b-int8 --blocks
    """
    from wanpack.manifests.format import read_manifest

    manifest = read_manifest(pack)
    if json_out:
        print_json(asdict(manifest))
        return
    out.print(f"[bold]{escape(str(pack))}[/]  format {manifest.format} v{manifest.format_version}, {manifest.created_by}; "
              f"source: {manifest.source.kind} ({len(manifest.source.files)} files)"
              f"{'; RANDOM weights (wanpack synth)' if manifest.source.synthetic else ''}")  # fmt: skip
    summary = Table(title="components")
    for col in ("component", "arch", "quant", "layout", "blocks", "shards", "size", "largest block", "phases"):
        summary.add_column(col)
    for comp in manifest.components.values():
        size = sum(s.size for s in comp.shards)
        largest = max((b.length for b in comp.blocks), default=0)
        phases = ", ".join(r.name for r in comp.blocks[0].phases) if comp.blocks else "-"
        summary.add_row(comp.name, comp.arch, comp.quant.scheme, comp.layout, str(comp.num_blocks),
                        str(len(comp.shards)), human_bytes(size), human_bytes(largest), phases)  # fmt: skip
    out.print(summary)
    if not blocks:
        return
    detail = Table(title="shards")
    for col in ("shard", "size", "tensors", "block", "phase ranges [offset, length)"):
        detail.add_column(col)
    for comp in manifest.components.values():
        ranges = {b.shard: [] for b in comp.blocks}
        for b in comp.blocks:
            ranges[b.shard] += [f"{b.index}.{r.name} [{r.offset}, {r.length})" for r in b.phases]
        for s in comp.shards:
            detail.add_row(s.path, human_bytes(s.size), str(len(s.tensors)), "-" if s.block is None else str(s.block),
                           "\n".join(ranges.get(s.path, [])) or "-")  # fmt: skip
    out.print(detail)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
