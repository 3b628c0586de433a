"""One place for how commands talk: results on stdout, progress and logs on stderr, errors as one line.

Both consoles read rich markup: text from the user (paths, messages quoting them) goes through ``rich.markup.escape``
first, or a ``[`` in a path would be taken for a tag and cut out of the line.
"""

from __future__ import annotations

import json
import os
import sys

from rich.console import Console

_WIDTH = None if sys.stdout.isatty() else 160  # pipes and CI logs get full-width tables, not 80 columns
out = Console(highlight=False, width=_WIDTH)  # results (tables, summaries)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # progress, logs, warnings: whole lines, never wrapped


def debug_enabled() -> bool:
    """WANPACK_DEBUG=1 turns one-line errors back into full tracebacks."""
    return os.environ.get("WANPACK_DEBUG", "") not in ("", "0", "false")


def print_json(data) -> None:
    """Machine-readable result on stdout, nothing else on that stream."""
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    err.print(message)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
