"""`wanpack convert`: turn a Wan2.1 checkpoint into a quantized, block-streamable pack."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape

from wanpack.commands._common import byte_progress, guarded
from wanpack.output import err, human_bytes, out, print_json


@guarded
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder (hub layout or LightX2V blocks) or .safetensors file."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Pack folder to create."),
    quant: str = typer.Option("int8", "--quant", "-q", help="int8, fp8 or none (bf16)."),
    save_by_block: bool = typer.Option(False, "--save-by-block/--single-file",
                                       help="One shard per DiT block (block_N.safetensors) or one model.safetensors."),
    component: list[str] = typer.Option(["dit"], "--component", "-c", help="dit, t5, clip, vae or all (repeatable)."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture, when config.json does not settle it."),
    lora: list[Path] = typer.Option([], "--lora", help="LoRA safetensors to merge into the DiT (repeatable)."),
    lora_strength: list[float] = typer.Option([], "--lora-strength", help="Strength per --lora (default 1.0)."),
    keep_fp32: bool = typer.Option(False, "--keep-fp32", help="Keep norms, modulation, embeddings and head in fp32."),
    hash_source: bool = typer.Option(True, "--hash-source/--no-hash-source", help="Record the source files' sha256."),
    force: bool = typer.Option(False, "--force", help="Replace an existing pack at --out (in one atomic swap, after "
                               "the runs using it finish)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Convert a Wan2.1 checkpoint into a pack, streaming one tensor at a time.

    Examples:
      wanpack convert ./Wan2.1-T2V-14B --quant int8 --save-by-block --out ./t2v-14b-int8
      wanpack convert ./Wan2.1-I2V-14B-480P -c all --quant fp8 --save-by-block --out ./i2v-480p-fp8
      wanpack convert ./src --lora distill_lora.safetensors --lora-strength 1.0 --out ./distilled
    """
    # The reader and hasher threads need the cores that OpenMP workers would otherwise spin on between torch ops
    # (measured: a third less CPU time for the same conversion). Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from wanpack.convert.converter import ConvertOptions, convert_checkpoint
    from wanpack.errors import UsageError

    if len(lora_strength) > len(lora):
        raise UsageError("more --lora-strength values than --lora files")
    strengths = list(lora_strength) + [1.0] * (len(lora) - len(lora_strength))
    components = tuple(component)
    source_path, catalog_arch = _resolve_source(source)
    opts = ConvertOptions(quant=quant, save_by_block=save_by_block, components=components, arch=arch or catalog_arch,
                          loras=[(str(p), s) for p, s in zip(lora, strengths, strict=True)], keep_fp32=keep_fp32,
                          hash_source=hash_source, force=force)  # fmt: skip
    with byte_progress("converting", enabled=not json_out) as progress:
        manifest, stats = convert_checkpoint(source_path, out_dir, opts, progress=progress,
                                             log=lambda message: err.print(f"[yellow]{escape(message)}[/]"))  # fmt: skip
    summary = {
        "pack": str(out_dir), "components": list(manifest.components), "quant": quant,
        "layout": "by_block" if save_by_block else "single", "source_bytes": stats.source_bytes,
        "pack_bytes": stats.pack_bytes, "seconds": round(stats.seconds, 3), "source_gbps": round(stats.gbps, 3),
        "peak_rss_bytes": stats.peak_rss_bytes,
    }  # fmt: skip
    if json_out:
        print_json(summary)
        return
    out.print(f"wrote {escape(str(out_dir))} ({', '.join(manifest.components)}, {quant}, {summary['layout']}): "
              f"source {human_bytes(stats.source_bytes)} -> pack {human_bytes(stats.pack_bytes)} in "
              f"{stats.seconds:.1f} s ({stats.gbps:.2f} GB/s), peak RSS {human_bytes(stats.peak_rss_bytes)}")  # fmt: skip


def _resolve_source(source: str) -> tuple[Path, str | None]:
    """A folder or file path as given; or a downloaded catalog entry, whose architecture the catalog states."""
    path = Path(source)
    if path.exists():
        return path, None
    from wanpack.convert.download import resolve_source
    from wanpack.manifests.catalog import find_entry

    entry = find_entry(source)
    return resolve_source(source), entry.arch if entry else None


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
