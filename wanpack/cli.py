"""The `wanpack` command: a thin Typer app; every command lives in its own module under wanpack.commands.

Exit codes: 0 ok, 1 error (a failed `verify` included), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import typer

from wanpack import __version__
from wanpack.commands import bench, convert, download, inspect, plan, run, serve, synth, verify

app = typer.Typer(
    name="wanpack",
    help="Convert Wan2.1 checkpoints into quantized, block-streamable packs and run them on small GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wanpack {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """wanpack: Wan2.1 packs for small GPUs."""


for _module in (download, synth, convert, inspect, verify, plan, run, serve, bench):
    _module.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
