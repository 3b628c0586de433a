"""`wanpack verify`: re-hash every file of a pack against its manifest."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from wanpack.commands._common import guarded
from wanpack.output import err, out, print_json


@guarded
def verify(
    pack: Path = typer.Argument(..., help="Pack folder."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check the size and sha256 of every file the manifest lists (shards and tokenizer files) and each shard's
    safetensors header (offsets, dtypes, shapes) against the manifest; exit 1 if any differ.

    Examples:
      wanpack verify ./t2v-14b-int8
    """
    from wanpack.convert.verify import verify_pack
    from wanpack.errors import VerificationError

    report = verify_pack(pack)
    if json_out:
        print_json({"pack": str(pack), "checked": report.checked, "bad": report.problems,
                    "no_recorded_hash": report.unrecorded})  # fmt: skip
    for path in report.unrecorded:
        err.print(f"[yellow]note:[/] {escape(str(path))}: the manifest records no hash for it (a format-1 pack), so "
                  "only its presence was checked - convert again to record one")  # fmt: skip
    if report.problems:
        for path, why in report.problems.items():
            err.print(f"[red]bad:[/] {escape(f'{path}: {why}')}")
        raise VerificationError(f"{len(report.problems)} of {report.checked} files in {pack} do not match the "
                                "manifest - convert the pack again")  # fmt: skip
    if not json_out:
        out.print(f"ok: {report.checked} files in {escape(str(pack))} match the manifest")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
