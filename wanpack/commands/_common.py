"""Helpers every command shares: the error guard, checks of flag values, and the byte progress display."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from wanpack.errors import UsageError, WanpackError
from wanpack.output import debug_enabled, err, human_bytes

F = TypeVar("F", bound=Callable)
_fast_exit: list[bool] = []


def allow_fast_exit() -> None:
    """A command that has closed every file and handle it opened says so; the console entry point then ends the
    process without the interpreter's teardown (module finalizers, the CUDA context's orderly destruction), which
    cost about a second after every `wanpack run` on the H200 host."""
    _fast_exit.append(True)


def fast_exit_allowed() -> bool:
    return bool(_fast_exit)


def guarded(fn: F) -> F:
    """Turn WanpackError into one red line on stderr and the error's exit code (no traceback unless WANPACK_DEBUG)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WanpackError as exc:
            if debug_enabled():
                raise
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted - nothing half-written was left behind")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def check_choice(flag: str, value: str | None, choices: tuple[str, ...] | list[str]) -> str | None:
    """``value`` (or None: not given) if it is one of ``choices``, else a usage error naming the flag."""
    if value is not None and value not in choices:
        raise UsageError(f"{flag} {value!r} is not one of {', '.join(choices)} - pick one of those")
    return value


def check_at_least(flag: str, value: int | None, low: int) -> int | None:
    """``value`` (or None: not given) if it is at least ``low``, else a usage error naming the flag."""
    if value is not None and value < low:
        raise UsageError(f"{flag} must be at least {low}, got {value}")
    return value


GIB = 1 << 30
BUDGET_HELP = "e.g. 8GiB or 512MiB; a bare number is GiB"
# Option aliases the commands that run a pack share (run, serve): one spelling and help text for each flag.
VramBudget = Annotated[str | None, typer.Option("--vram-budget", help=f"GPU memory to use, {BUDGET_HELP} (default: free).")]
RamBudget = Annotated[str | None, typer.Option("--ram-budget", help=f"Host RAM to use, {BUDGET_HELP} (default: available).")]
DeviceOption = Annotated[str | None, typer.Option("--device", help="cuda or cpu (default: cuda when present).")]


def parse_budget(flag: str, text: str | None) -> int | None:
    """A memory budget in bytes (None: not given), the same on every command: a size string (8GiB, 512MiB, 16G) or a
    bare number, which means GiB (8 is 8 GiB, never 8 bytes)."""
    if text is None:
        return None
    from wanpack.runtime.stream.planner import parse_size

    try:
        size = int(float(text) * GIB)
    except ValueError:
        try:
            size = parse_size(text)
        except UsageError:
            raise UsageError(f"cannot read {flag} {text!r} - write it like 8GiB or 512MiB (a bare number is GiB)") from None
    if size <= 0:
        raise UsageError(f"{flag} must be more than 0, got {text!r} - e.g. {flag} 8GiB")
    return size


def budget_gib(flag: str, text: str | None) -> float | None:
    """``parse_budget`` in GiB, as RunConfig's ``*_budget_gib`` settings hold it (None: not given)."""
    size = parse_budget(flag, text)
    return None if size is None else size / GIB


PLAIN_EVERY_S = 10.0  # piped output: one progress line this often, plus the last one


@contextlib.contextmanager
def byte_progress(label: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A ``(done, total)`` bytes callback drawn on stderr: a bar with speed and time left on a terminal, and plain
    lines (percent, bytes, time left) when stderr is piped, so logs stay readable."""
    if not enabled:
        yield lambda done, total: None
        return
    if err.is_terminal:
        columns = (TextColumn(escape(label)), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    start = last = time.perf_counter()
    finished = False

    def plain(done: int, total: int) -> None:
        nonlocal last, finished
        now = time.perf_counter()
        if finished or total <= 0:
            return
        if done >= total:
            finished = True
            err.print(f"{escape(label)}: {human_bytes(total)} in {now - start:.1f} s")
        elif now - last >= PLAIN_EVERY_S:
            last = now
            left = (now - start) * (total - done) / max(done, 1)
            err.print(f"{escape(label)}: {100 * done / total:.0f}% ({human_bytes(done)} of {human_bytes(total)}), "
                      f"about {left:.0f} s left")  # fmt: skip

    yield plain


def say_graph_mode_is_bench_only() -> None:
    """`run` and `serve` answer ENABLE_GRAPH_MODE (a bad value is a UsageError) instead of ignoring it."""
    from wanpack.runtime.stream.env import graph_mode_notice

    if notice := graph_mode_notice():
        err.print(f"[yellow]{escape(notice)}[/]", soft_wrap=True)
