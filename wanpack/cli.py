"""The `wanpack` command: a thin Typer app; every command lives in its own module under wanpack.commands.

Exit codes: 0 ok, 1 error (a failed `verify` included), 2 usage, 130 interrupted.
"""

from __future__ import annotations

import os
import sys

import typer

from wanpack import __version__
from wanpack.commands import bench, convert, download, inspect, plan, run, serve, synth, verify
from wanpack.commands._common import fast_exit_allowed

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
    """Console-script entry point. After a command that allowed it (see ``allow_fast_exit``), the process ends
    right away with the command's exit code, once stdout and stderr are flushed."""
    try:
        app()
    except SystemExit as exc:
        if fast_exit_allowed() and (exc.code is None or isinstance(exc.code, int)):
            code = exc.code or 0
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):  # a reader that went away (`| head`) or a closed stream
                    code = code or 1
            os._exit(code)
        raise


if __name__ == "__main__":
    main()
