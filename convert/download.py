"""Download catalog checkpoints from the Hugging Face Hub: planned, space-checked, resumable, and verified.

How it works (huggingface_hub >= 2 does the HTTP, auth, redirects, error classes and the cache layout):
1. ``HfApi.model_info(files_metadata=True)`` pins the revision to a commit and lists every file with its size, git
   blob id and, for LFS files, the LFS sha256; ``filter_repo_objects`` applies the catalog's allow patterns.
2. The free space of the target is checked against the bytes still missing, before anything is written.
3. Every file streams through ``huggingface_hub.file_download.http_get`` into a partial file that survives an
   interrupted run; the next run resumes it with an HTTP Range request. (huggingface_hub 2.x itself deletes its
   partial files when a download fails, so its own downloads only resume within one process.) The partial file is
   hashed and only moved into place (cache blob or --dir file) when it matches the Hub's digest (LFS sha256, or the
   git blob SHA-1 of a small file), so a corrupt file never looks like a finished one. The cache layout (blobs named
   by digest, snapshot symlinks, refs) and the --dir metadata are written here in huggingface_hub's format, not by
   ``hf_hub_download``: that one names cache blobs after the ETag header of a HEAD request, unchecked.
4. Files already present are re-hashed and checked the same way; a mismatch deletes the file and fails.
Nothing the server says is trusted (docs/FORMAT.md, threat model): digests and the commit must be lowercase hex of
the exact length before they become part of a path, file names may not climb out of the folder, and every path
written or deleted must resolve inside the cache's repo folder or --dir.
Offline (HF_HUB_OFFLINE=1) the cache is used without any request; blobs are checked against the digest they are
named by (the Hub's etag: LFS sha256 or git blob SHA-1).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from wanpack.errors import NoSpaceError, SourceError, UsageError, VerificationError, WanpackError
from wanpack.manifests.catalog import CatalogEntry, find_entry
from wanpack.manifests.format import SHA256_HEX

_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_HASH_CHUNK = 8 << 20
PART_SUFFIX = ".wanpack-part"


class HubError(SourceError):
    """The Hub refused or could not serve a request (not found, gated, offline, network)."""


# --------------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class HubSettings:
    """The HF_* environment, read when a download starts (not when huggingface_hub was imported)."""

    endpoint: str
    token: str | None
    cache_dir: Path
    offline: bool

    @classmethod
    def from_env(cls) -> HubSettings:
        env = os.environ
        home = Path(env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
        cache = Path(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or home / "hub")
        token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or _saved_token(home)
        offline = env.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
        endpoint = (env.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
        return cls(endpoint, token, cache.expanduser(), offline)


def _saved_token(home: Path) -> str | None:
    """The token `hf auth login` stored under HF_HOME, if any."""
    path = Path(os.environ.get("HF_TOKEN_PATH") or home / "token")
    with contextlib.suppress(OSError):
        return path.read_text().strip() or None
    return None


# --------------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class RemoteFile:
    """One file of the pinned commit as the Hub describes it."""

    name: str
    size: int
    digest: str  # LFS sha256 for LFS files, else the git blob SHA-1
    lfs: bool

    @property
    def algorithm(self) -> str:
        return "sha256" if self.lfs else "git-sha1"


@dataclass(frozen=True)
class Request:
    """What to fetch: a repo at a revision, limited to some file patterns."""

    repo_id: str
    revision: str
    patterns: list[str] | None  # None: the whole repo
    entry: CatalogEntry | None
    components: tuple[str, ...] | None


def make_request(name_or_repo: str, components: tuple[str, ...] | None = None, revision: str | None = None) -> Request:
    """Map a catalog name or a repo id (owner/name) to a download request."""
    entry = find_entry(name_or_repo)
    if entry is not None:
        return Request(entry.repo_id, revision or entry.revision, entry.patterns(components), entry, components)
    if "/" not in name_or_repo or name_or_repo.count("/") != 1:
        raise UsageError(f"unknown model {name_or_repo!r} - pick a name from `wanpack download --list` or a repo id")
    if components:
        raise UsageError(f"{name_or_repo} is not in the catalog, so --component has no meaning - drop it")
    return Request(name_or_repo, revision or "main", None, None, None)


def _matches(name: str, patterns: list[str] | None) -> bool:
    """huggingface_hub's own allow-pattern rule (fnmatch; a pattern ending in '/' means everything below)."""
    from huggingface_hub.utils import filter_repo_objects

    return any(True for _ in filter_repo_objects([name], allow_patterns=patterns))


def plan_remote(request: Request, settings: HubSettings) -> tuple[str, list[RemoteFile]]:
    """Pin the revision to a commit and list the requested files with sizes and digests (one API call)."""
    from huggingface_hub import HfApi

    with hub_errors(request.repo_id, request.revision, settings):
        info = HfApi(endpoint=settings.endpoint, token=settings.token).model_info(
            request.repo_id, revision=request.revision, files_metadata=True
        )
    commit = _hex_or_refuse(info.sha, _SHA1, "commit hash", request.repo_id)
    files = [_remote_file(s) for s in info.siblings or [] if _matches(s.rfilename, request.patterns)]
    _check_components(request, [f.name for f in files], f"{request.repo_id}@{commit[:12]}")
    return commit, files


def _hex_or_refuse(value: object, pattern: re.Pattern, what: str, where: str) -> str:
    """Server-provided digests and commits become file and folder names: only exact-length lowercase hex passes."""
    if not isinstance(value, str) or not pattern.match(value):
        raise HubError(f"the Hub sent an invalid {what} {str(value)[:80]!r} for {where} - refusing to use it as a file "
                       "name; check HF_ENDPOINT points at a real Hub")  # fmt: skip
    return value


def _size_or_refuse(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HubError(f"the Hub sent an invalid size {value!r} for {name} - check HF_ENDPOINT points at a real Hub")
    return value


def _remote_file(sibling) -> RemoteFile:
    name = sibling.rfilename
    parts = name.split("/") if isinstance(name, str) else [""]
    if name.startswith(("/", "\\")) or "\\" in name or ".." in parts or "" in parts or ":" in parts[0] or "\0" in name:
        raise HubError(f"the Hub listed an unsafe file name {name!r} - refusing to write it")
    if sibling.lfs:
        digest = _hex_or_refuse(sibling.lfs.sha256, SHA256_HEX, "LFS sha256", name)
        return RemoteFile(name, _size_or_refuse(sibling.lfs.size, name), digest, True)
    digest = _hex_or_refuse(sibling.blob_id, _SHA1, "git blob id", name)
    return RemoteFile(name, _size_or_refuse(sibling.size or 0, name), digest, False)


def _check_revision(revision: str) -> str:
    """A revision names a file under refs/ in the cache: it may contain '/' (refs/pr/1) but never climb out."""
    parts = revision.split("/")
    if not revision or revision.startswith("/") or "\\" in revision or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"revision {revision!r} is not a valid branch, tag or commit name - pass another --revision")
    return revision


def _check_components(request: Request, names: list[str], where: str, hint: str | None = None) -> None:
    """Every requested component must match at least one file (else the entry is stale, or, offline, not fetched)."""
    if request.entry is None:
        if not names:
            raise HubError(f"{where} has no files - check the repo id and revision")
        return
    for comp in request.components or tuple(request.entry.components):
        pats = list(request.entry.components[comp])
        if not any(_matches(n, pats) for n in names):
            hint = hint or f"the catalog entry {request.entry.name} may be out of date; pass --revision or a repo id"
            raise HubError(f"{where} has no file matching {comp} patterns {pats} - {hint}")


# --------------------------------------------------------------------------------------------------------- errors


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str, settings: HubSettings) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one-line HubErrors."""
    from huggingface_hub import errors as hfe

    try:
        yield
    except hfe.GatedRepoError as exc:
        raise HubError(f"{repo_id} is gated (HTTP {_status(exc)}) - accept its terms on {settings.endpoint}/{repo_id} "
                       "while logged in, then set HF_TOKEN to a token of that account") from None  # fmt: skip
    except hfe.RepositoryNotFoundError as exc:
        raise HubError(f"{repo_id} was not found or needs a token (HTTP {_status(exc)}) - check the name "
                       "(wanpack download --list), or set HF_TOKEN for a private repo") from None  # fmt: skip
    except hfe.RevisionNotFoundError:
        raise HubError(f"revision {revision!r} does not exist in {repo_id} - pass a branch, tag or commit") from None
    except hfe.RemoteEntryNotFoundError as exc:
        raise HubError(f"a file is missing from {repo_id}@{revision} ({exc.response.url}) - "
                       "the catalog entry may be out of date; pass --revision") from None  # fmt: skip
    except (hfe.OfflineModeIsEnabled, hfe.LocalEntryNotFoundError):
        raise HubError(f"{repo_id}@{revision} is not in the cache {settings.cache_dir} and HF_HUB_OFFLINE is set "
                       "- unset HF_HUB_OFFLINE to download it, or point HF_HOME at the cache that has it") from None
    except hfe.HfHubHTTPError as exc:
        if _status(exc) in ("401", "403"):
            raise HubError(f"the Hub refused the token for {repo_id} (HTTP {_status(exc)}) - check HF_TOKEN "
                           "(or `hf auth login`) and that the account may read this repo") from None  # fmt: skip
        raise HubError(f"the Hub answered HTTP {_status(exc)} for {repo_id} - try again later") from None
    except _network_errors() as exc:
        raise HubError(f"download from {settings.endpoint} failed ({type(exc).__name__}: {exc}) - check the network "
                       "or HF_ENDPOINT; run the same command again to resume") from None  # fmt: skip


def _status(exc) -> str:
    response = getattr(exc, "response", None)
    return str(getattr(response, "status_code", "?"))


def _network_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    with contextlib.suppress(ImportError):
        import httpx2

        errors += (httpx2.TransportError,)
    return errors


# --------------------------------------------------------------------------------------------------------- verify


def file_digest(path: Path, algorithm: str, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of the bytes, or the git blob SHA-1 (sha1 over 'blob <size>\\0' + bytes) the Hub lists as blobId."""
    h = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


def algorithm_of(digest: str) -> str | None:
    """Which digest an etag / blob name is: 64 hex -> LFS sha256, 40 hex -> git blob SHA-1."""
    return "sha256" if SHA256_HEX.match(digest) else "git-sha1" if _SHA1.match(digest) else None


def verify_or_remove(path: Path, expected: str, algorithm: str, label: str, also_remove: tuple[Path, ...] = (),
                     progress: Progress | None = None, root: Path | None = None) -> None:  # fmt: skip
    """Raise VerificationError (after deleting the bad bytes) unless ``path`` hashes to ``expected``. With ``root``,
    nothing is deleted unless it lies inside ``root``."""
    on_bytes = None
    if progress is not None:
        task = f"{algorithm} {label}"
        progress.file_started(task, path.stat().st_size, 0)
        on_bytes = functools.partial(progress.advance, task)
    got = file_digest(path, algorithm, on_bytes)
    if got == expected:
        return
    doomed = (path, *also_remove)
    if root is not None:
        for p in doomed:  # all checked before any is deleted
            inside(p, root)
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    raise VerificationError(f"{label} is corrupt: {algorithm} {got[:16]}... but the Hub says {expected[:16]}... - "
                            "the bad file was deleted; run the command again to download it afresh")  # fmt: skip


def inside(path: Path, root: Path) -> Path:
    """``path`` itself (its folder resolved, a final symlink not followed), refused unless it lies inside ``root``.
    Called on every path written or deleted, so no server metadata or planted symlink reaches outside."""
    where = Path(os.path.realpath(path.parent)) / path.name
    top = Path(os.path.realpath(root))
    if top not in where.parents:
        raise HubError(f"refusing to write or delete {path}: it resolves to {where}, outside {root} - the download "
                       "metadata or the cache is hostile or damaged; delete the folder and download again")  # fmt: skip
    return path


# --------------------------------------------------------------------------------------------------------- progress


class Progress(Protocol):
    """Where byte counts go (the CLI draws them with Rich; tests may pass None)."""

    def file_started(self, name: str, total: int, done: int) -> None: ...
    def advance(self, name: str, n: int) -> None: ...
    def file_done(self, name: str) -> None: ...
    def note(self, message: str) -> None: ...


class _Cancelled(Exception):
    """Raised inside a worker's transfer when another file failed or the user pressed Ctrl-C."""


class _Bar:
    """The tqdm-shaped object huggingface_hub's http_get drives; forwards bytes to a Progress and stops on cancel."""

    def __init__(self, progress: Progress | None, name: str, cancel: threading.Event | None = None,
                 total: int | None = None, initial: int = 0, **_):  # fmt: skip
        self._progress, self._name, self._cancel = progress, name, cancel

    def update(self, n: int = 1) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise _Cancelled(self._name)
        if self._progress is not None:
            self._progress.advance(self._name, n)

    def close(self) -> None:
        pass

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _note(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress.note(message)


# --------------------------------------------------------------------------------------------------------- targets


@dataclass
class FileResult:
    name: str
    size: int
    algorithm: str  # what was checked: sha256 (LFS), git-sha1 (small files), or none (offline, nothing to check)
    digest: str | None
    downloaded: int = 0  # bytes fetched in this run
    resumed_from: int = 0  # bytes already in a partial file from an earlier run


@dataclass
class DownloadResult:
    repo_id: str
    revision: str
    commit: str
    folder: Path
    offline: bool
    files: list[FileResult] = field(default_factory=list)
    entry: CatalogEntry | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class _Target:
    """Where a file's bytes end up: the HF cache (blobs + snapshot symlinks) or a plain folder (--dir)."""

    def __init__(self, settings: HubSettings, repo_id: str, commit: str, local_dir: Path | None):
        self.settings, self.repo_id, self.commit, self.local_dir = settings, repo_id, commit, local_dir
        self.storage = settings.cache_dir / ("models--" + repo_id.replace("/", "--"))

    @property
    def root(self) -> Path:
        """Everything this download writes or deletes lies inside this folder."""
        return self.local_dir if self.local_dir is not None else self.storage

    @property
    def folder(self) -> Path:
        return self.local_dir if self.local_dir is not None else self.storage / "snapshots" / self.commit

    def final(self, f: RemoteFile) -> Path:
        """Where a verified file is stored (the blob, for the cache)."""
        return inside(self.local_dir / f.name if self.local_dir is not None else self.storage / "blobs" / f.digest,
                      self.root)  # fmt: skip

    def part(self, f: RemoteFile) -> Path:
        if self.local_dir is not None:
            return inside(self.local_dir / ".cache" / "wanpack" / f"{f.name}.{f.digest[:16]}{PART_SUFFIX}", self.root)
        return inside(self.storage / "blobs" / f"{f.digest}{PART_SUFFIX}", self.root)

    def link(self, f: RemoteFile) -> Path:
        """The name a user opens: the snapshot symlink (cache) or the file itself (--dir)."""
        return inside(self.folder / f.name, self.root)

    def space_root(self) -> Path:
        path = self.local_dir if self.local_dir is not None else self.settings.cache_dir
        path = path.resolve()
        while not path.exists():
            path = path.parent
        return path


def check_space(target: _Target, files: list[RemoteFile]) -> int:
    """Bytes still to fetch; raise NoSpaceError before any download when the disk cannot hold them."""
    needed = 0
    for f in files:
        if target.final(f).exists() or (target.folder / f.name).exists():
            continue
        part = target.part(f)
        needed += f.size - (part.stat().st_size if part.exists() and part.stat().st_size <= f.size else 0)
    root = target.space_root()
    free = shutil.disk_usage(root).free
    if needed > free:
        raise NoSpaceError(f"download needs {_gib(needed)} more but {root} has {_gib(free)} free - free some space, "
                           "or pass --dir (or HF_HOME) on a bigger disk")  # fmt: skip
    return needed


def _gib(n: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


# --------------------------------------------------------------------------------------------------------- fetch


def _fetch_all(target: _Target, files: list[RemoteFile], progress: Progress | None, workers: int) -> list[FileResult]:
    """Small files first, one by one (no progress bars); then the LFS files on ``workers`` threads. The first failure
    (or Ctrl-C) stops the other transfers at their next chunk; their partial files stay for the next run."""
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    cancel = threading.Event()
    done = {f.name: _fetch_file(target, f, None, cancel) for f in files if not f.lfs}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wanpack-dl") as pool:
        futures = {pool.submit(_fetch_file, target, f, progress, cancel): f for f in files if f.lfs}
        try:
            for fut in as_completed(futures):
                done[futures[fut].name] = fut.result()
        except BaseException:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [done[f.name] for f in files]


def _fetch_file(target: _Target, f: RemoteFile, progress: Progress | None, cancel: threading.Event) -> FileResult:
    """Resume or start the partial file, hash it, then move it into place and link it."""
    result = FileResult(f.name, f.size, f.algorithm, f.digest)
    final = target.final(f)
    recorded = _local_etag(target.local_dir, f.name) if target.local_dir is not None else None
    if final.exists() and recorded not in (None, f.digest):
        final.unlink()  # a --dir file from another revision: replace it, it is not corrupt
    if final.exists():
        verify_or_remove(final, f.digest, f.algorithm, f.name, also_remove=(target.link(f),), progress=progress,
                         root=target.root)  # fmt: skip
    else:
        part = target.part(f)
        part.parent.mkdir(parents=True, exist_ok=True)
        have = part.stat().st_size if part.exists() else 0
        if have > f.size:  # not ours or from another revision: start over
            part.unlink()
            have = 0
        result.resumed_from = have
        _http_fetch(target, f, part, have, progress, cancel)
        result.downloaded = f.size - have
        verify_or_remove(part, f.digest, f.algorithm, f.name, progress=progress, root=target.root)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
    _register(target, f)
    return result


def _http_fetch(target: _Target, f: RemoteFile, part: Path, have: int, progress: Progress | None,
                cancel: threading.Event) -> None:  # fmt: skip
    """Append the missing bytes to ``part`` (Range request from ``have``) through huggingface_hub's http_get."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    settings = target.settings
    url = hf_hub_url(target.repo_id, f.name, revision=target.commit, endpoint=settings.endpoint)
    headers = build_hf_headers(token=settings.token or False, library_name="wanpack")
    if progress is not None:
        progress.file_started(f.name, f.size, have)
    with open(part, "ab") as fh:
        try:
            http_get(url, fh, resume_size=have, headers=headers, expected_size=f.size, displayed_filename=f.name,
                     tqdm_class=functools.partial(_Bar, progress, f.name, cancel))  # fmt: skip
        except OSError as exc:
            if isinstance(exc, HfHubHTTPError | ConnectionError | TimeoutError):
                raise
            fh.close()
            part.unlink(missing_ok=True)  # wrong size from the server: nothing worth resuming
            raise HubError(f"{f.name} arrived with the wrong size ({exc}) - run the command again") from None
    if progress is not None:
        progress.file_done(f.name)


def _register(target: _Target, f: RemoteFile) -> None:
    """Make a verified file visible the way huggingface_hub lays it out: a relative snapshot symlink to the blob
    (cache), or the download metadata (--dir: commit, etag, timestamp lines, which huggingface_hub reads too)."""
    if target.local_dir is None:
        link, blob = target.link(f), target.final(f)
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = inside(link.with_name(f".{link.name}.{os.getpid()}.{threading.get_ident()}.wanpack-link"), target.root)
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), tmp)
        os.replace(tmp, link)
        return
    meta = inside(target.local_dir / ".cache" / "huggingface" / "download" / f"{f.name}.metadata", target.root)
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(f"{target.commit}\n{f.digest}\n{time.time()}\n")


# --------------------------------------------------------------------------------------------------------- public


def download(name_or_repo: str, *, components: tuple[str, ...] | None = None, revision: str | None = None,
             local_dir: Path | None = None, progress: Progress | None = None, workers: int = 4,
             settings: HubSettings | None = None) -> DownloadResult:  # fmt: skip
    """Fetch a catalog entry (or a whole repo) into the HF cache or ``local_dir``; every file is checked."""
    settings = settings or HubSettings.from_env()
    request = make_request(name_or_repo, components, revision)
    _check_revision(request.revision)
    if settings.offline:
        return _local_result(request, settings, local_dir, verify=True)
    commit, files = plan_remote(request, settings)
    target = _Target(settings, request.repo_id, commit, local_dir)
    needed = check_space(target, files)
    _note(progress, f"{request.repo_id}@{commit[:12]}: {len(files)} files, {_gib(sum(f.size for f in files))}, "
                    f"{_gib(needed)} to fetch into {target.folder}")  # fmt: skip
    result = DownloadResult(request.repo_id, request.revision, commit, target.folder, False, entry=request.entry)
    with hub_errors(request.repo_id, request.revision, settings):
        result.files = _fetch_all(target, files, progress, workers)
    if local_dir is None and request.revision != commit:
        ref = inside(target.storage / "refs" / _check_revision(request.revision), target.root)
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return result


def _local_result(request: Request, settings: HubSettings, local_dir: Path | None, verify: bool,
                  every_component: bool = True) -> DownloadResult:  # fmt: skip
    """What is already on disk for a request, without touching the network (offline mode, resolve_source)."""
    repo, rev = request.repo_id, request.revision
    hint = "unset HF_HUB_OFFLINE and run `wanpack download` to fetch it, or point HF_HOME at the cache that has it"
    if local_dir is not None:
        commit, folder = rev, local_dir
    else:
        storage = settings.cache_dir / ("models--" + repo.replace("/", "--"))
        ref = storage / "refs" / _check_revision(rev)
        commit = rev if _SHA1.match(rev) else (ref.read_text().strip() if ref.is_file() else "")
        if commit and not _SHA1.match(commit):
            raise HubError(f"{ref} holds {commit[:80]!r}, not a commit hash - the cache is damaged; delete that file "
                           "and download again")  # fmt: skip
        folder = storage / "snapshots" / commit
    if not commit or not folder.is_dir():
        raise HubError(f"{repo}@{rev} is not in the cache {local_dir or settings.cache_dir} (HF_HUB_OFFLINE) - {hint}")
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and ".cache" not in p.relative_to(folder).parts)  # fmt: skip
    names = [n for n in names if _matches(n, request.patterns) and not n.endswith(PART_SUFFIX)]
    if every_component or not names:
        _check_components(request, names, f"{repo}@{rev} in {folder}", f"that component was not downloaded; {hint}")
    result = DownloadResult(repo, rev, commit, folder, True, entry=request.entry)
    root = local_dir if local_dir is not None else folder.parent.parent
    for name in names:
        result.files.append(_check_local(folder / name, name, local_dir, verify, root))
    return result


def _check_local(path: Path, name: str, local_dir: Path | None, verify: bool, root: Path) -> FileResult:
    """Check a file on disk against the digest its cache blob is named by (or its --dir metadata etag)."""
    blob = Path(os.path.realpath(path))
    digest = blob.name if local_dir is None else _local_etag(local_dir, name)
    algorithm = algorithm_of(digest or "")
    if verify and algorithm is not None:
        verify_or_remove(path, digest, algorithm, name, also_remove=(blob,) if blob != path else (), root=root)
    return FileResult(name, path.stat().st_size, algorithm or "none", digest)


def _local_etag(local_dir: Path, name: str) -> str | None:
    """The etag huggingface_hub recorded for a --dir file in .cache/huggingface/download/<name>.metadata (lines:
    commit, etag, timestamp). Read directly: huggingface_hub's reader ignores it once the file is modified, which is
    exactly when a check against it matters."""
    meta = local_dir / ".cache" / "huggingface" / "download" / f"{name}.metadata"
    with contextlib.suppress(OSError, IndexError):
        etag = meta.read_text().splitlines()[1].strip()
        return etag if algorithm_of(etag) else None
    return None


def resolve_source(name_or_path: str) -> Path:
    """The local checkpoint for a folder path, a catalog name or a repo id already in the HF cache.

    A folder path comes back as is. A catalog name or repo id gives its snapshot folder, except for one-file entries
    (the lightx2v distill DiTs and LoRAs, which share one repo and so one snapshot folder): those give the file itself,
    which `wanpack convert` takes as a source (or --lora). No network and no hashing: `wanpack download` checked the
    files when it fetched them. :func:`resolve_components` lists an entry's files per component.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{name_or_path} is a file - pass the checkpoint folder (or a catalog name)")
    result = _resolve_cached(name_or_path)
    patterns = result.entry.patterns() if result.entry is not None else []
    if len(patterns) == 1 and not any(c in patterns[0] for c in "*?[") and len(result.files) == 1:
        return result.folder / result.files[0].name
    return result.folder


def resolve_components(name_or_path: str) -> dict[str, list[Path]]:
    """The files of each component of a downloaded catalog entry (folder paths map to {'all': [folder]})."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return {"all": [path]}
    result = _resolve_cached(name_or_path)
    if result.entry is None:
        return {"all": [result.folder]}
    return {comp: [result.folder / f.name for f in result.files if _matches(f.name, list(pats))]
            for comp, pats in result.entry.components.items()}  # fmt: skip


def _resolve_cached(name: str) -> DownloadResult:
    try:
        request = make_request(name)
    except UsageError:
        raise UsageError(f"{name!r} is neither a folder nor a catalog name - pass the checkpoint folder, "
                          "or a name from `wanpack download --list`") from None  # fmt: skip
    settings = HubSettings.from_env()
    try:
        return _local_result(request, settings, None, verify=False, every_component=False)
    except WanpackError:
        raise SourceError(f"{name} is not downloaded (looked in {settings.cache_dir}) - run `wanpack download {name}` "
                          "first, or pass the checkpoint folder") from None  # fmt: skip
