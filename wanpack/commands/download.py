"""`wanpack download`: list the model catalog, or fetch a checkpoint from the Hugging Face Hub (resumable, verified)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

from wanpack.commands._common import guarded
from wanpack.output import err, human_bytes, out, print_json


class _RichFiles:
    """The download Progress protocol drawn as one Rich bar per file on stderr (sizes, speed, time left)."""

    def __init__(self, progress: RichProgress):
        self._progress, self._tasks = progress, {}

    def file_started(self, name: str, total: int, done: int) -> None:
        label = f"{name} (resuming)" if done else name
        self._tasks[name] = self._progress.add_task(label, total=total, completed=done)

    def advance(self, name: str, n: int) -> None:
        task: TaskID | None = self._tasks.get(name)
        if task is not None:
            self._progress.advance(task, n)

    def file_done(self, name: str) -> None:
        pass

    def note(self, message: str) -> None:
        self._progress.console.print(message)


def _list(as_json: bool) -> None:
    from wanpack.manifests.catalog import load_catalog

    entries = load_catalog()
    if as_json:
        print_json({name: {"repo_id": e.repo_id, "revision": e.revision, "arch": e.arch, "preset": e.preset,
                           "verified": e.verified, "components": {c: list(p) for c, p in e.components.items()},
                           "encoders_from": e.encoders_from, "approx_gb": e.approx_gb, "description": e.description}
                    for name, e in entries.items()})  # fmt: skip
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("name", "repo", "arch", "preset", "components", "size", "checked"):
        table.add_column(col, no_wrap=col in ("name", "repo"), overflow="fold")
    for e in entries.values():
        comps = ",".join(e.components) + (f" (+{e.encoders_from})" if e.encoders_from else "")
        size = f"~{e.approx_gb:g} GB" if e.approx_gb else "?"
        table.add_row(e.name, e.repo_id, e.arch.removeprefix("wan2.1-"), e.preset, comps, size,
                      "yes" if e.verified else "no")  # fmt: skip
    out.print(table)
    out.print("(+NAME): the entry holds only a DiT or LoRA; its T5/CLIP/VAE/tokenizer come from entry NAME.\n"
              "checked no: file names not confirmed from a primary source. Sizes are approximate; --json for all.")


def _summary(result, as_json: bool) -> None:
    if as_json:
        print_json({"repo_id": result.repo_id, "revision": result.revision, "commit": result.commit,
                    "folder": str(result.folder), "offline": result.offline, "total_bytes": result.total_bytes,
                    "arch": result.entry.arch if result.entry else None,
                    "preset": result.entry.preset if result.entry else None,
                    "files": [vars(f) for f in result.files]})  # fmt: skip
        return
    checked = sum(f.algorithm != "none" for f in result.files)
    fetched = sum(f.downloaded for f in result.files)
    out.print(f"{result.repo_id}@{result.commit[:12]}: {len(result.files)} files, {human_bytes(result.total_bytes)} "
              f"in {result.folder}")  # fmt: skip
    how = ("offline: each cached file against the digest huggingface_hub named it by" if result.offline
           else "LFS: sha256 vs the Hub's LFS oid; others: git blob SHA-1")  # fmt: skip
    out.print(f"fetched {human_bytes(fetched)}; {checked}/{len(result.files)} files checked ({how})")
    if result.entry is not None:
        out.print(f"next: wanpack convert {result.entry.name} --arch {result.entry.arch} ...")


@guarded
def download(
    name: str | None = typer.Argument(None, help="Catalog name (see --list) or a Hub repo id owner/name."),
    list_: bool = typer.Option(False, "--list", "-l", help="Show the catalog and exit."),
    component: list[str] | None = typer.Option(None, "--component", "-c",
                                               help="dit, t5, clip, vae, tokenizer or lora (repeatable; default all)."),
    revision: str | None = typer.Option(None, "--revision", "-r", help="Branch, tag or commit (default: catalog's)."),
    dir_: Path | None = typer.Option(None, "--dir", "-d", help="Plain folder to download into (default: HF cache)."),
    workers: int = typer.Option(4, "--workers", "-j", help="Large files downloaded at the same time."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Download a Wan2.1 checkpoint from the Hugging Face Hub (resumable; every file checked against the Hub's hashes).

    Honours HF_HOME, HF_HUB_CACHE, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE. Exit codes: 0 ok, 1 error (Hub,
    network, disk, or a file that failed its checksum and was deleted), 2 usage, 130 interrupted (partial files resume
    next time).

    Examples:
      wanpack download --list
      wanpack download i2v-14b-480p
      wanpack download t2v-1.3b -c dit -c vae --dir ./wan-1.3b
      HF_HUB_OFFLINE=1 wanpack download t2v-14b        # check what is cached, no network
    """
    from wanpack.convert.download import download as fetch
    from wanpack.errors import UsageError

    if list_:
        _list(as_json)
        return
    if not name:
        raise UsageError("missing model name - pass a catalog name or repo id, or --list to see the catalog")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with RichProgress(*columns, console=err, transient=False) as bars:
        result = fetch(name, components=tuple(component) if component else None, revision=revision,
                       local_dir=dir_, progress=_RichFiles(bars), workers=workers)  # fmt: skip
    _summary(result, as_json)


def register(app: typer.Typer) -> None:
    app.command("download")(download)
