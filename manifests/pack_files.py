"""Opening a file a manifest names, without trusting the pack it came from (docs/FORMAT.md, threat model).

A relative path from a manifest is only a wish: after symlinks are resolved it MUST still lie inside the pack, it
MUST be a regular file (a FIFO would block ``open`` forever, a device or /dev/zero would read endlessly), and its
real size MUST be the size the manifest records. The open uses O_NONBLOCK so that even a FIFO swapped in between the
check and the open cannot hang the caller; the flag is cleared again once fstat has shown a regular file.
Every refusal is one :class:`PackFormatError` line naming the file. Used by the runtime's shard readers and by
`wanpack verify`, so both apply the same rules.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from wanpack.errors import PackFormatError

_AGAIN = "the pack is damaged or not a wanpack pack; convert it again"


def resolve_inside(root: str | os.PathLike, rel: str | os.PathLike) -> Path:
    """``root/rel`` with every symlink resolved; refused unless it is still inside ``root`` (resolved too)."""
    top = Path(os.path.realpath(root))
    real = Path(os.path.realpath(top / rel))
    if top not in real.parents:
        raise PackFormatError(f"{Path(root) / rel}: resolves to {real}, outside the pack {top} - {_AGAIN}")
    return real


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` without blocking and return the fd only if it is a regular file (else close it and refuse)."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise PackFormatError(f"{path}: cannot open ({exc.strerror}) - the pack is incomplete or unreadable; "
                              "check the path and permissions, or convert again") from None  # fmt: skip
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise PackFormatError(f"{path}: is not a regular file ({_kind(mode)}) - {_AGAIN}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"))  # fmt: skip
    for test, name in kinds:
        if test(mode):
            return name
    return "not a plain file"


def check_size(fd: int, path: str | os.PathLike, expected: int | None) -> int:
    """The file's real size, refused when the manifest records another one."""
    size = os.fstat(fd).st_size
    if expected is not None and size != expected:
        raise PackFormatError(f"{path}: file is {size} bytes but the manifest says {expected} - the file is truncated "
                              "or replaced; convert the pack again")  # fmt: skip
    return size


def open_pack_file(root: str | os.PathLike, rel: str, expected_size: int | None = None,
                   flags: int = os.O_RDONLY) -> tuple[int, Path]:  # fmt: skip
    """(fd, resolved path) of a file the manifest lists: inside the pack, regular, and of the recorded size."""
    path = resolve_inside(root, rel)
    fd = open_regular(path, flags)
    try:
        check_size(fd, path, expected_size)
    except BaseException:
        os.close(fd)
        raise
    return fd, path
