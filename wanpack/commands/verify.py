"""`wanpack verify`: re-hash every shard of a pack against its manifest."""

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
    """Check every shard's size and sha256 (and its safetensors header) against the manifest; exit 1 if any differ.

    Examples:
      wanpack verify ./t2v-14b-int8
    """
    from wanpack.convert.verify import verify_pack
    from wanpack.errors import VerificationError

    problems, checked = verify_pack(pack)
    if json_out:
        print_json({"pack": str(pack), "checked": checked, "bad": problems})
    if problems:
        for path, why in problems.items():
            err.print(f"[red]bad:[/] {escape(f'{path}: {why}')}")
        raise VerificationError(f"{len(problems)} of {checked} files in {pack} do not match the manifest - "
                                "convert the pack again")  # fmt: skip
    if not json_out:
        out.print(f"ok: {checked} files in {escape(str(pack))} match the manifest")


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
