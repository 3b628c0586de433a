"""Helpers every command shares: the error guard and option aliases used by more than one command."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import typer

from wanpack.errors import WanpackError
from wanpack.output import debug_enabled, err

F = TypeVar("F", bound=Callable)


def guarded(fn: F) -> F:
    """Turn WanpackError into one red line on stderr and the error's exit code (no traceback unless WANPACK_DEBUG)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WanpackError as exc:
            if debug_enabled():
                raise
            err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted - nothing half-written was left behind")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
