"""A small fake of the Hugging Face Hub endpoints that huggingface_hub 2.x calls to download a model.

Only what the real client reads (checked against huggingface_hub 2.4's hf_api.model_info, file_download.http_get and
get_hf_file_metadata, utils._http.hf_raise_for_status):
- GET /api/models/{repo}[/revision/{rev}]?blobs=true -> {"id", "sha", "siblings": [{rfilename, size, blobId, lfs}]}
- HEAD|GET /{repo}/resolve/{rev}/{path} -> X-Repo-Commit, ETag, X-Linked-Etag and X-Linked-Size for LFS files,
  Content-Length; GET honours "Range: bytes=N-" / "bytes=N-M" with 206 + Content-Range.
- errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which the client maps to its
  exception classes.
Faults for tests: ``cut[path] = [n1, n2, ...]`` makes the k-th GET of that file send only n_k body bytes and drop the
connection (later GETs are served whole); ``corrupt.add(path)`` serves bytes with one byte flipped while the metadata
stays right. Hostile metadata: ``FakeRepo.meta[path]`` overrides fields of that file's sibling entry (``lfs`` one level
down), which also changes the ETag the file is served with; ``FakeRepo.info_sha`` is the commit model_info claims;
``FakeHub.etags[path]`` changes only the ETag headers.
Every request is logged as (method, path, Range header, status).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pth", ".bin")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = "a" * 40
    gated: bool = False  # files need "Authorization: Bearer <token>" with the hub's token
    meta: dict[str, dict] = field(default_factory=dict)  # hostile sibling fields per file
    info_sha: str | None = None  # what model_info says the commit is (default: commit)

    @classmethod
    def from_folder(cls, folder: Path, extra: dict[str, bytes] | None = None, **kw) -> FakeRepo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls({**files, **(extra or {})}, **kw)

    def sibling(self, name: str) -> dict:
        data = self.files[name]
        entry = {"rfilename": name, "size": len(data), "blobId": git_blob_sha1(data)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
        override = dict(self.meta.get(name, {}))
        if "lfs" in override and "lfs" in entry:
            entry["lfs"] = {**entry["lfs"], **override.pop("lfs")}
        return {**entry, **override}


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    token: str = "hf_fake_token"
    cut: dict[str, list[int]] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    etags: dict[str, str] = field(default_factory=dict)  # ETag header overrides per file
    log: list[list] = field(default_factory=list)  # [method, path, Range header, status]

    def __post_init__(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def ranges(self, filename: str) -> list[str | None]:
        """Range headers of the GETs for one file, in order."""
        return [r for m, p, r, _ in self.log if m == "GET" and p.endswith("/" + filename)]


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            entry = [self.command, path, self.headers.get("Range"), 0]
            hub.log.append(entry)  # before answering, so the client never finishes ahead of the log
            entry[3] = self._route(path, body)

        def _route(self, path: str, body: bool) -> int:
            if m := _INFO.match(path):
                return self._info(m["repo"], m["rev"] or "main")
            if m := _RESOLVE.match(path):
                return self._resolve(m["repo"], m["rev"], m["file"], body)
            return self._error(404, "RepoNotFound", "Not found")

        def _repo(self, repo_id: str, rev: str) -> FakeRepo | int:
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            if rev not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound", "Invalid rev id", commit=None)
            return repo

        def _info(self, repo_id: str, rev: str) -> int:
            repo = self._repo(repo_id, rev)
            if isinstance(repo, int):
                return repo
            data = {"id": repo_id, "sha": repo.info_sha or repo.commit, "gated": "manual" if repo.gated else False,
                    "siblings": [repo.sibling(n) for n in sorted(repo.files)]}  # fmt: skip
            raw = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return 200

        def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> int:
            repo = self._repo(repo_id, rev)
            if isinstance(repo, int):
                return repo
            if repo.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._error(401, "GatedRepo", "Access to model is restricted. You must have access to it.")
            if name not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found", commit=repo.commit)
            data = repo.files[name]
            if name in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            sib = repo.sibling(name)
            etag = hub.etags.get(name) or (sib["lfs"]["sha256"] if "lfs" in sib else sib["blobId"])
            start, end = self._range(len(data))
            status = 206 if self.headers.get("Range") else 200
            self.send_response(status)
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("ETag", f'"{etag}"')
            if "lfs" in sib:
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if body:
                self._send_body(name, data[start:end])
            return status

        def _range(self, size: int) -> tuple[int, int]:
            spec = self.headers.get("Range")
            if not spec:
                return 0, size
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", spec.strip())
            if m is None:
                raise ValueError(f"fake hub cannot parse Range {spec!r}")
            return int(m[1]), (int(m[2]) + 1 if m[2] else size)

        def _send_body(self, name: str, chunk: bytes) -> None:
            budgets = hub.cut.get(name)
            if budgets:
                self.wfile.write(chunk[: budgets.pop(0)])
                self.wfile.flush()
                self.close_connection = True  # the client sees a body shorter than Content-Length
                return
            self.wfile.write(chunk)

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> int:
            raw = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(raw)
            return status

    return Handler
