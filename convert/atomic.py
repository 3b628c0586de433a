"""Atomic output directories (packs, synthetic checkpoints): build in a hidden sibling, swap it into place only when
complete.

A pack is valid only once manifest.json exists, and the manifest is written last, inside the temporary folder
``.NAME.wanpack-tmp-<id>``; after everything is fsynced the folder takes the final name:
- a new pack: one rename;
- ``--force`` over an existing pack: one ``renameat2(RENAME_EXCHANGE)`` on Linux (the old and the new pack trade
  names in one step, so NAME is always a complete pack), then the old one, now under the temporary name, is deleted.
  Where the exchange is not available (another OS, an old kernel, some network filesystems) the old pack is first
  renamed aside to ``.NAME.wanpack-old-<id>``; if putting the new one in place fails, the old one is renamed back.
The whole conversion holds ``.NAME.wanpack-convert.lock`` (manifests/pack_lock.py): a second conversion to the same
--out is refused, and any hidden folder of NAME found while holding it was abandoned by a crashed conversion. The next
conversion therefore removes abandoned temporary folders, and, when NAME itself is missing, renames an abandoned
``old`` pack back to NAME instead of deleting it (a crash between the two renames of the fallback left it there).
The swap itself also holds the pack's pin lock exclusively, so it waits for running `wanpack run`s of the old pack.
An existing folder is replaced only with ``force`` and only when it holds the marker file of what is written
(``manifest.json`` for a pack, ``wanpack_synth.json`` for a synthetic checkpoint), so a user's own folder is never
deleted; an empty folder is simply filled.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from wanpack.errors import UsageError
from wanpack.manifests.format import MANIFEST_NAME
from wanpack.manifests.pack_lock import convert_lock, exclusive_pin, pack_location

TMP_MARK = ".wanpack-tmp-"
OLD_MARK = ".wanpack-old-"
LEGACY_OLD_MARK = ".wanpack-tmp-old-"  # where wanpack 0.1 put the old pack during --force
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _renameat2():
    """glibc's renameat2 (2.28+), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or filesystem cannot (then nothing changed)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _holds(path: Path, marker: str) -> bool:
    """Whether ``path`` is a real folder (not a link) with ``marker`` in it: one of ours, complete."""
    return path.is_dir() and not path.is_symlink() and (path / marker).is_file()


class AtomicPackDir:
    """Context for writing one pack: files go to ``.tmp``; ``commit()`` publishes them under ``final``; leaving the
    block without a commit removes ``.tmp`` and keeps whatever was at ``final``.

    ``marker`` is the file that identifies a folder this may replace, ``what`` names that kind of folder in messages.
    """

    def __init__(self, final: str | os.PathLike, force: bool = False, log: Callable[[str], None] | None = None,
                 marker: str = MANIFEST_NAME, what: str = "a wanpack pack"):  # fmt: skip
        self.final = pack_location(final)  # a symlinked --out is written where the link points
        self.log = log or (lambda message: None)
        self.marker, self.what = marker, what
        self.committed = False
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(convert_lock(self.final))
        try:
            self._clean_up_after_crashes()
            self._check_replaceable(force)
            self.tmp = self._hidden(TMP_MARK)
            self.tmp.mkdir()
        except BaseException:
            self._lock.close()
            raise

    def __enter__(self) -> AtomicPackDir:
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.abort()

    def _hidden(self, mark: str) -> Path:
        return self.final.parent / f".{self.final.name}{mark}{os.getpid()}-{secrets.token_hex(4)}"

    def _clean_up_after_crashes(self) -> None:
        """Holding the convert lock, every hidden folder of this pack is abandoned: put an old pack back if the pack
        is missing, delete the rest."""
        marks = (f".{self.final.name}{TMP_MARK}", f".{self.final.name}{OLD_MARK}")
        leftovers = [p for p in self.final.parent.iterdir() if p.name.startswith(marks) and p.is_dir()
                     and not p.is_symlink()]  # fmt: skip
        leftovers.sort(key=_mtime, reverse=True)
        if not os.path.lexists(self.final):
            old = [p for p in leftovers if (OLD_MARK in p.name or LEGACY_OLD_MARK in p.name) and _holds(p, self.marker)]
            if old:
                os.rename(old[0], self.final)
                _fsync_dir(self.final.parent)
                leftovers.remove(old[0])
                self.log(f"recovered the previous pack at {self.final} from {old[0].name}, left by an interrupted "
                         "--force replacement")  # fmt: skip
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)

    def _check_replaceable(self, force: bool) -> None:
        if not os.path.lexists(self.final):
            return
        if self.final.is_dir() and not self.final.is_symlink() and not any(self.final.iterdir()):
            return  # an empty folder (made for the output, say) loses nothing
        if not force:
            raise UsageError(f"{self.final} already exists - choose another --out or pass --force to replace it")
        if not _holds(self.final, self.marker):
            raise UsageError(f"{self.final} exists and is not {self.what} - refusing to replace it even with "
                             "--force; choose another --out")  # fmt: skip

    def commit(self) -> Path:
        """Publish ``.tmp`` as ``final`` (see the module docstring); the old pack, if any, is gone afterwards."""
        _fsync_dir(self.tmp)
        if os.path.lexists(self.final):
            # only a pack is pinned by runs; no lock file is made beside other folders
            pin = exclusive_pin(self.final, self.log) if self.marker == MANIFEST_NAME else contextlib.nullcontext()
            with pin:
                old = self._swap()
        else:
            os.rename(self.tmp, self.final)
            old = None
        _fsync_dir(self.final.parent)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._lock.close()
        return self.final

    def _swap(self) -> Path:
        """Put ``.tmp`` at ``final``; return where the old pack is now. On failure ``final`` is the old pack."""
        if exchange(self.tmp, self.final):
            return self.tmp
        old = self._hidden(OLD_MARK)
        os.rename(self.final, old)
        try:
            os.rename(self.tmp, self.final)
        except BaseException:
            os.rename(old, self.final)  # if even this fails, the next conversion renames it back
            raise
        return old

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._lock.close()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
