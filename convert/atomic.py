"""Atomic output directories (packs, synthetic checkpoints): build in a hidden sibling, rename into place when complete.

A pack is valid only once manifest.json exists, and the manifest is written last, inside the temporary folder; the
folder is renamed to its final name after everything is fsynced. Ctrl-C, a crash or a full disk therefore leave
either the old state or a hidden ``.NAME.wanpack-tmp-PID`` folder without a manifest, which the next run removes.
An existing folder is replaced only with ``force`` and only when it holds the marker file of what we write (or is
empty), so a user's own folder is never deleted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from wanpack.errors import UsageError
from wanpack.manifests.format import MANIFEST_NAME

TMP_MARK = ".wanpack-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicPackDir:
    """Context for writing one pack: ``.tmp`` is where files go; ``commit()`` publishes them under ``final``.

    ``marker`` is the file that identifies a folder this may replace, ``what`` names that kind of folder in messages.
    """

    def __init__(self, final: str | os.PathLike, force: bool = False, marker: str = MANIFEST_NAME,
                 what: str = "a wanpack pack"):  # fmt: skip
        self.final = Path(final).absolute()
        empty_dir = self.final.is_dir() and not any(self.final.iterdir())
        if self.final.exists() and not empty_dir:
            if not force:
                raise UsageError(f"{self.final} already exists - choose another --out or pass --force to replace it")
            if not self.final.is_dir() or not (self.final / marker).is_file():
                raise UsageError(f"{self.final} exists and is not {what} - refusing to replace it even with "
                                 "--force; choose another --out")  # fmt: skip
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        self.tmp = self.final.parent / f".{self.final.name}{TMP_MARK}{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()

    def _remove_stale(self) -> None:
        for p in self.final.parent.glob(f".{self.final.name}{TMP_MARK}*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)

    def commit(self) -> Path:
        _fsync_dir(self.tmp)
        trash = None
        if self.final.exists():
            trash = self.final.parent / f".{self.final.name}{TMP_MARK}old-{os.getpid()}"
            os.rename(self.final, trash)
        os.rename(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
