"""`wanpack synth`: write a random-weight checkpoint in the exact Wan2.1 hub layout (tests, benchmarks, the demo)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from wanpack.commands._common import byte_progress, guarded
from wanpack.output import human_bytes, out

COMPONENTS = ("dit", "t5", "clip", "vae")


@guarded
def synth(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the checkpoint into."),
    arch: str = typer.Option("wan2.1-t2v-1.3b", "--arch", help="wan2.1-t2v-1.3b | wan2.1-t2v-14b | wan2.1-i2v-14b"),
    layers: int | None = typer.Option(None, "--layers", help="Number of DiT blocks (default: the real count)."),
    dim_scale: str = typer.Option("full", "--dim-scale", help="full (real widths) or tiny (tests and demo)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Source DiT dtype: fp32 (as on the hub) or bf16."),
    shards: int = typer.Option(1, "--shards", help="Split the DiT into K files plus an index json, like the hub."),
    component: list[str] = typer.Option(["dit"], "--component", "-c", help="dit, t5, clip, vae or all (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same values."),
    as_pack: bool = typer.Option(False, "--as-pack", help="Write a converted pack directly (no source files): "
                                                          "full-size benchmark packs without a 60 GB source."),  # fmt: skip
    quant: str | None = typer.Option(None, "--quant", help="With --as-pack: int8 (default), fp8 or none."),
    force: bool = typer.Option(False, "--force", help="Replace an existing synthetic checkpoint or pack at --out."),
) -> None:
    """Write a synthetic (random-weight) Wan2.1 checkpoint in the hub's file layout.

    Examples:
      wanpack synth --arch wan2.1-t2v-14b --dim-scale tiny --layers 2 --out /tmp/src
      wanpack synth --arch wan2.1-i2v-14b --dim-scale tiny -c all --shards 3 --out /tmp/i2v
      wanpack synth --arch wan2.1-t2v-14b -c all --as-pack --quant int8 --out /tmp/t2v-14b-int8
    """
    from wanpack.convert.synth import synth_checkpoint
    from wanpack.errors import UsageError

    wanted = set(COMPONENTS) if "all" in component else set(component)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise UsageError(f"unknown --component {sorted(unknown)} - choose from {', '.join(COMPONENTS)} or all")
    if as_pack:
        from wanpack.convert.converter import ConvertOptions
        from wanpack.convert.quantize import check_scheme
        from wanpack.convert.synth_pack import synth_pack

        quant = check_scheme(quant or "int8")
        with byte_progress("synth (pack)") as progress:
            manifest, stats = synth_pack(out_dir, arch, layers=layers, dim_scale=dim_scale,
                                         components=tuple(sorted(wanted)), options=ConvertOptions(quant=quant, force=force),
                                         seed=seed, progress=progress)  # fmt: skip
        out.print(f"wrote pack {escape(str(out_dir))} ({arch}, {dim_scale}, RANDOM weights, {quant}): "
                  f"{', '.join(manifest.components)}, {human_bytes(stats.pack_bytes)} in {stats.seconds:.1f} s")  # fmt: skip
        return
    if quant is not None:
        raise UsageError("--quant applies only with --as-pack (a synthetic source is written unquantized, like the hub's "
                         "files) - drop --quant, or add --as-pack")  # fmt: skip
    with byte_progress("synth") as progress:
        written = synth_checkpoint(out_dir, arch, layers=layers, dim_scale=dim_scale, dtype=dtype, shards=shards,
                                   seed=seed, components=tuple(sorted(wanted)), force=force, progress=progress)  # fmt: skip
    total = sum(p.stat().st_size for paths in written.values() for p in paths)
    out.print(f"wrote {arch} ({dim_scale}, random weights) to {escape(str(out_dir))}: "
              f"{', '.join(sorted(written))}, {human_bytes(total)}")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
