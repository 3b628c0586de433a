"""Who may touch a pack while another process uses it: advisory flock locks on hidden files beside the pack.

Two lock files sit next to PACK, never inside it (the folder itself is replaced by a rename):
- ``.PACK.wanpack-convert.lock``: held exclusively by a conversion writing PACK, from before it looks at the folder
  until it has finished. A second conversion to the same --out is refused at once. While a conversion holds it, every
  ``.PACK.wanpack-tmp-*`` folder is known to be abandoned (its owner would hold the lock), whatever PID namespace or
  host it came from: that is how stale temporary folders are told from live ones.
- ``.PACK.wanpack-pin.lock``: held shared by a run for as long as it reads the pack (:func:`pinned_pack`), and
  exclusively by a conversion only around the moment it replaces PACK (:func:`exclusive_pin`), which waits for the
  runs, so a run never mixes the files of two packs.
flock locks belong to an open file, so they are released when the process ends however it ends (kill -9 included).
Lock files are never deleted: removing one races with a process that has just opened it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from wanpack.errors import PackBusyError, UsageError
from wanpack.manifests.format import MANIFEST_NAME, Manifest, read_manifest_with_digest

CONVERT = "convert"
PIN = "pin"


def pack_location(pack: str | os.PathLike) -> Path:
    """The pack's real path (symlinks resolved), so every name for one pack finds the same lock files."""
    return Path(os.path.realpath(pack))


def lock_path(pack: str | os.PathLike, purpose: str) -> Path:
    where = pack_location(pack)
    return where.parent / f".{where.name}.wanpack-{purpose}.lock"


def _open_lock(path: Path, create: bool) -> int | None:
    """An fd to lock on; None when the file cannot be created (a read-only folder: nobody can replace the pack)."""
    try:
        return os.open(path, (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if create and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            with contextlib.suppress(OSError):
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return None
        raise


@contextlib.contextmanager
def convert_lock(pack: str | os.PathLike) -> Iterator[None]:
    """Held for a whole conversion to ``pack``; a second conversion to the same folder is refused, not queued (it
    would only find the folder taken after waiting, or silently replace the first one's result with --force)."""
    path = lock_path(pack, CONVERT)
    fd = _open_lock(path, create=True)
    if fd is None:
        raise UsageError(f"cannot create the lock file {path} - --out must be in a folder you can write")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PackBusyError(f"another wanpack convert is writing {pack_location(pack)} right now - wait for it to "
                                "finish, or choose another --out") from None  # fmt: skip
        yield
    finally:
        os.close(fd)  # closing the only fd releases the lock


@contextlib.contextmanager
def exclusive_pin(pack: str | os.PathLike, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Held while a conversion replaces ``pack``: waits until no run has it pinned (telling ``on_wait`` once)."""
    path = lock_path(pack, PIN)
    fd = _open_lock(path, create=True)
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"waiting for the runs using {pack_location(pack)} to finish before replacing it "
                        "(Ctrl-C gives up and keeps the old pack)")  # fmt: skip
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class PinnedPack:
    """A pack that no wanpack conversion will replace while the pin is held, and the manifest read under it."""

    path: Path
    manifest: Manifest
    manifest_sha256: str  # of the very bytes ``manifest`` was parsed from
    pinned: bool  # False only where no lock file exists and none can be created (a read-only folder)


@contextlib.contextmanager
def pinned_pack(pack: str | os.PathLike) -> Iterator[PinnedPack]:
    """Pin ``pack`` for the duration of the block (a shared lock: any number of runs at once) and read its manifest.

    A conversion with --force to the same folder waits until every pin is released; a pin asked for while a
    conversion is swapping the folder waits the few milliseconds the swap takes.
    """
    is_pack = os.path.lexists(pack_location(pack) / MANIFEST_NAME)  # no lock files beside folders that are no pack
    fd = _open_lock(lock_path(pack, PIN), create=True) if is_pack else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_SH)
        manifest, digest = read_manifest_with_digest(pack)
        yield PinnedPack(Path(pack), manifest, digest, fd is not None)
    finally:
        if fd is not None:
            os.close(fd)
