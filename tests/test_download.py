"""`wanpack download` and the catalog, through the real huggingface_hub client against a fake Hub on 127.0.0.1.

The fake (tests/fakehub.py) serves a tiny synthetic T2V-14B-layout checkpoint under the catalog's repo id. Nothing
here reaches the internet: HF_ENDPOINT points at the fake and HF_HOME at a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import huggingface_hub.constants
import huggingface_hub.file_download
import pytest
from fakehub import FakeHub, FakeRepo
from typer.testing import CliRunner

from wanpack.cli import app
from wanpack.convert import download as dl
from wanpack.convert.synth import SYNTH_DECLARATION
from wanpack.errors import SourceError, UsageError
from wanpack.manifests.arch import DIT_ARCHS
from wanpack.manifests.catalog import COMPONENTS, find_entry, load_catalog
from wanpack.manifests.run_config import preset_names

REPO = "Wan-AI/Wan2.1-T2V-14B"
SHARD = "diffusion_pytorch_model-00001-of-00002.safetensors"
VAE = "Wan2.1_VAE.pth"
TOKENIZER = {"google/umt5-xxl/tokenizer.json": b'{"model": "fake"}\n', "google/umt5-xxl/spiece.model": b"\x00" * 300}
CHUNK = 1024
pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def repo(tiny_t2v: Path) -> FakeRepo:
    extra = {**TOKENIZER, "README.md": b"# not wanted by any component\n"}
    fake = FakeRepo.from_folder(tiny_t2v, extra, commit="c0ffee" + "0" * 34)
    fake.files.pop(SYNTH_DECLARATION, None)  # wanpack's own marker for synthetic folders; no Hub repo has it
    return fake


@pytest.fixture
def hub(repo: FakeRepo, tmp_path: Path, monkeypatch) -> FakeHub:
    gated = FakeRepo({"config.json": b"{}", "diffusion_pytorch_model.safetensors": b"x" * 1000}, gated=True)
    with FakeHub({REPO: repo, "Wan-AI/Wan2.1-T2V-1.3B": gated}) as server:
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                    "HF_TOKEN_PATH"):  # fmt: skip
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # in case the shell exported it
        monkeypatch.setattr(huggingface_hub.file_download.time, "sleep", lambda s: None)  # http_get's retry pause
        # http_get keeps only whole chunks it has read (10 MiB by default) when a connection drops; tiny files need
        # tiny chunks for the same behaviour.
        monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
        yield server


def run(*args: str):
    return CliRunner().invoke(app, ["download", *args])


def snapshot(tmp_path: Path, repo: FakeRepo) -> Path:
    return tmp_path / "hf" / "hub" / ("models--" + REPO.replace("/", "--")) / "snapshots" / repo.commit


def test_catalog_entries_are_complete_and_valid(tiny_t2v: Path):
    entries = load_catalog()
    repos = {e.repo_id for e in entries.values()}
    assert {"Wan-AI/Wan2.1-T2V-1.3B", REPO, "Wan-AI/Wan2.1-I2V-14B-480P", "Wan-AI/Wan2.1-I2V-14B-720P",
            "lightx2v/Wan2.1-Distill-Models", "lightx2v/Wan2.1-Distill-Loras"} <= repos  # fmt: skip
    for e in entries.values():
        assert e.arch in DIT_ARCHS and set(e.components) <= set(COMPONENTS) and e.revision
        assert e.preset in preset_names(), e.name
        assert e.verified == e.repo_id.startswith("Wan-AI/"), e.name  # lightx2v layouts are marked unverified
    assert find_entry(REPO).name == "t2v-14b"
    assert find_entry("lightx2v/Wan2.1-Distill-Models") is None  # shared by several entries: ambiguous
    # Each component's patterns pick exactly its files from the hub layout, and no two components share a file.
    names = sorted({p.relative_to(tiny_t2v).as_posix() for p in tiny_t2v.rglob("*") if p.is_file()} | set(TOKENIZER))
    names.remove(SYNTH_DECLARATION)
    picked = {c: {n for n in names if dl._matches(n, list(p))} for c, p in entries["t2v-14b"].components.items()}
    assert picked["dit"] == {"config.json", SHARD, SHARD.replace("00001-", "00002-"),
                             "diffusion_pytorch_model.safetensors.index.json"}  # fmt: skip
    assert picked["t5"] == {"models_t5_umt5-xxl-enc-bf16.pth"} and picked["vae"] == {VAE}
    assert picked["tokenizer"] == {n for n in names if n.startswith("google/umt5-xxl/")} >= set(TOKENIZER)
    assert sum(len(v) for v in picked.values()) == len(set().union(*picked.values())) == len(names)


def test_list_shows_every_entry():
    res = run("--list", "--json")
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)) == set(load_catalog())
    res = CliRunner().invoke(app, ["download", "--list"], env={"COLUMNS": "160"})
    assert res.exit_code == 0 and "i2v-14b-720p" in res.stdout and "Wan-AI/Wan2.1-I2V-14B-720P" in res.stdout


def test_full_download_into_cache(hub: FakeHub, repo: FakeRepo, tmp_path: Path):
    res = run("t2v-14b", "--json", "--workers", "3")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    snap = snapshot(tmp_path, repo)
    assert Path(out["folder"]) == snap and out["commit"] == repo.commit and out["arch"] == "wan2.1-t2v-14b"
    wanted = sorted(n for n in repo.files if n != "README.md")
    assert sorted(f["name"] for f in out["files"]) == wanted
    for name in wanted:
        assert (snap / name).read_bytes() == repo.files[name], name
    algos = {f["name"]: f["algorithm"] for f in out["files"]}
    assert algos[SHARD] == algos[VAE] == "sha256" and algos["config.json"] == "git-sha1"
    assert not (snap / "README.md").exists()
    assert (snap.parent.parent / "refs" / "main").read_text() == repo.commit
    # Blobs are named by the LFS sha256, as huggingface_hub names them, so other tools share the cache.
    assert Path((snap / SHARD).resolve()).name == hashlib.sha256(repo.files[SHARD]).hexdigest()
    assert dl.resolve_source("t2v-14b") == snap
    assert dl.resolve_components("t2v-14b")["vae"] == [snap / VAE]


def test_download_to_dir_then_nothing_to_fetch(hub: FakeHub, repo: FakeRepo, tmp_path: Path):
    dest = tmp_path / "plain"
    res = run("t2v-14b", "-c", "dit", "--dir", str(dest), "--json")
    assert res.exit_code == 0, res.output
    files = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert files == {n for n in repo.files if n.startswith(("diffusion", "config"))}
    assert all((dest / n).read_bytes() == repo.files[n] for n in files)
    seen = len(hub.log)
    res = run("t2v-14b", "-c", "dit", "--dir", str(dest), "--json")
    assert res.exit_code == 0, res.output
    assert sum(f["downloaded"] for f in json.loads(res.stdout)["files"]) == 0
    new_file_gets = [e for e in hub.log[seen:] if e[0] == "GET" and "/resolve/" in e[1] and e[1].endswith("tensors")]
    assert new_file_gets == []  # present files are re-hashed, not fetched again


def test_dropped_connection_resumes_with_range(hub: FakeHub, repo: FakeRepo):
    cut = len(repo.files[SHARD]) // 3 // CHUNK * CHUNK
    hub.cut[SHARD] = [cut]
    res = run("t2v-14b", "-c", "dit")
    assert res.exit_code == 0, res.output
    assert hub.ranges(SHARD) == [None, f"bytes={cut}-"]  # second GET asks only for the missing bytes


def test_interrupted_run_resumes_next_run(hub: FakeHub, repo: FakeRepo, tmp_path: Path):
    size = len(repo.files[SHARD])
    chunk = size // 10 // CHUNK * CHUNK
    # The first GET breaks after `chunk` bytes, the next five send nothing: huggingface_hub's http_get retries five
    # times without progress, then gives up, as when the network goes away for good.
    hub.cut[SHARD] = [chunk] + [0] * 5
    res = run("t2v-14b", "-c", "dit")
    assert res.exit_code == 1
    assert "run the same command again to resume" in res.stderr and "Traceback" not in res.output
    digest = hashlib.sha256(repo.files[SHARD]).hexdigest()
    blobs = snapshot(tmp_path, repo).parent.parent / "blobs"
    part = blobs / (digest + dl.PART_SUFFIX)
    assert part.stat().st_size == chunk and not (blobs / digest).exists()
    assert hub.cut[SHARD] == [] and len(hub.ranges(SHARD)) == 6
    res = run("t2v-14b", "-c", "dit", "--json")
    assert res.exit_code == 0, res.output
    assert hub.ranges(SHARD)[-1] == f"bytes={chunk}-"  # the server saw the resume point
    rec = next(f for f in json.loads(res.stdout)["files"] if f["name"] == SHARD)
    assert rec["resumed_from"] == chunk and rec["downloaded"] == size - chunk
    assert (blobs / digest).read_bytes() == repo.files[SHARD] and not part.exists()


def test_corrupt_transfer_fails_checksum_and_leaves_nothing(hub: FakeHub, repo: FakeRepo, tmp_path: Path):
    hub.corrupt.add(VAE)
    res = run("t2v-14b", "-c", "vae")
    assert res.exit_code == 1
    assert f"{VAE} is corrupt: sha256" in res.stderr and "deleted" in res.stderr
    storage = snapshot(tmp_path, repo).parent.parent
    assert not [p for p in (storage / "blobs").iterdir()]  # neither a blob nor a partial file
    assert not (snapshot(tmp_path, repo) / VAE).exists()
    hub.corrupt.clear()
    assert run("t2v-14b", "-c", "vae").exit_code == 0


def test_parallel_failure_leaves_only_valid_blobs(hub: FakeHub, repo: FakeRepo, tmp_path: Path):
    hub.corrupt.add(SHARD)
    res = run("t2v-14b", "--workers", "4")
    assert res.exit_code == 1 and f"{SHARD} is corrupt" in res.stderr
    blobs = snapshot(tmp_path, repo).parent.parent / "blobs"
    for blob in blobs.iterdir():  # whatever finished is correct; the rest is a visibly partial file or absent
        if not blob.name.endswith(dl.PART_SUFFIX):
            algorithm = dl.algorithm_of(blob.name)
            assert algorithm and dl.file_digest(blob, algorithm) == blob.name
    assert not (blobs / hashlib.sha256(repo.files[SHARD]).hexdigest()).exists()
    hub.corrupt.clear()
    assert run("t2v-14b").exit_code == 0


def test_corrupted_cached_file_is_detected_and_removed(hub: FakeHub, repo: FakeRepo, tmp_path: Path):
    assert run("t2v-14b", "-c", "dit").exit_code == 0
    blob = (snapshot(tmp_path, repo) / SHARD).resolve()
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    res = run("t2v-14b", "-c", "dit")
    assert res.exit_code == 1 and f"{SHARD} is corrupt" in res.stderr
    assert not blob.exists() and not (snapshot(tmp_path, repo) / SHARD).is_symlink()
    assert run("t2v-14b", "-c", "dit").exit_code == 0
    assert (snapshot(tmp_path, repo) / SHARD).read_bytes() == repo.files[SHARD]


def test_gated_repo_needs_token(hub: FakeHub, monkeypatch):
    res = run("t2v-1.3b", "-c", "dit")
    assert res.exit_code == 1
    assert "Wan-AI/Wan2.1-T2V-1.3B is gated (HTTP 401)" in res.stderr and "HF_TOKEN" in res.stderr
    assert res.stderr.count("error:") == 1 and "Traceback" not in res.stderr
    monkeypatch.setenv("HF_TOKEN", hub.token)
    res = run("t2v-1.3b", "-c", "dit")
    assert res.exit_code == 0, res.output


def test_missing_repo_and_revision_are_clear(hub: FakeHub):
    res = run("nobody/nothing")
    assert res.exit_code == 1 and "nobody/nothing was not found or needs a token (HTTP 404)" in res.stderr
    res = run("t2v-14b", "--revision", "v9")
    assert res.exit_code == 1 and "revision 'v9' does not exist in Wan-AI/Wan2.1-T2V-14B" in res.stderr
    res = run("t2v-14b", "-c", "clip")
    assert res.exit_code == 2 and "has no component clip" in res.stderr


def test_offline_uses_cache_without_requests(hub: FakeHub, repo: FakeRepo, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run("t2v-14b")
    assert res.exit_code == 1 and "not in the cache" in res.stderr and "HF_HUB_OFFLINE" in res.stderr
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert run("t2v-14b").exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.log)
    res = run("t2v-14b", "--json")
    assert res.exit_code == 0, res.output
    assert len(hub.log) == seen  # no request at all
    files = json.loads(res.stdout)["files"]
    assert len(files) == len(repo.files) - 1 and all(f["algorithm"] in ("sha256", "git-sha1") for f in files)
    assert dl.resolve_source("t2v-14b") == snapshot(tmp_path, repo)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    dest = tmp_path / "plain"
    assert run("t2v-14b", "-c", "vae", "--dir", str(dest)).exit_code == 0
    (dest / VAE).write_bytes(b"tampered")
    os.utime(dest / VAE, (time.time() + 60, time.time() + 60))  # clearly modified after the download was recorded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run("t2v-14b", "-c", "vae", "--dir", str(dest))
    assert res.exit_code == 1 and f"{VAE} is corrupt" in res.stderr and not (dest / VAE).exists()


def test_not_enough_disk_space_stops_before_download(hub: FakeHub, monkeypatch):
    class Usage:
        free = 1000

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: Usage)
    res = run("t2v-14b")
    assert res.exit_code == 1
    assert "download needs" in res.stderr and "has 1000 B free" in res.stderr
    assert [e for e in hub.log if "/resolve/" in e[1]] == []  # only the metadata call was made


def test_resolve_source_paths_and_errors(hub: FakeHub, repo: FakeRepo, tmp_path: Path):
    assert dl.resolve_source(str(tmp_path)) == tmp_path
    with pytest.raises(SourceError, match="is not downloaded"):
        dl.resolve_source("i2v-14b-480p")
    with pytest.raises(SourceError, match="is a file"):
        dl.resolve_source(str(Path(__file__)))
    assert run("t2v-14b", "-c", "dit").exit_code == 0  # a partial download is enough: convert checks what it needs
    assert dl.resolve_source("t2v-14b") == snapshot(tmp_path, repo)
    assert dl.resolve_components("t2v-14b")["t5"] == []
    with pytest.raises(UsageError, match="neither a folder nor a catalog name"):
        dl.resolve_source("no-such-model")


def test_shared_repo_entry_fetches_only_its_file(hub: FakeHub, tmp_path: Path):
    names = ["wan2.1_i2v_480p_lightx2v_4step.safetensors", "wan2.1_i2v_480p_int8_lightx2v_4step.safetensors"]
    hub.repos["lightx2v/Wan2.1-Distill-Models"] = FakeRepo({n: n.encode() * 50 for n in names}, commit="d" * 40)
    res = run("distill-i2v-480p", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [f["name"] for f in out["files"]] == names[:1] and out["preset"] == "distill-4step"
    assert dl.resolve_components("distill-i2v-480p") == {"dit": [Path(out["folder"]) / names[0]]}
    assert dl.resolve_source("distill-i2v-480p") == Path(out["folder"]) / names[0]  # one-file entry: the file
    res = run("distill-i2v-480p-int8", "--json")  # the same snapshot folder gains the second file
    assert res.exit_code == 0 and json.loads(res.stdout)["folder"] == out["folder"]
    assert dl.resolve_components("distill-i2v-480p") == {"dit": [Path(out["folder"]) / names[0]]}


def test_dir_file_from_an_older_commit_is_replaced_not_flagged(hub: FakeHub, repo: FakeRepo, tmp_path: Path):
    dest = tmp_path / "plain"
    assert run("t2v-14b", "-c", "vae", "--dir", str(dest)).exit_code == 0
    newer = FakeRepo({**repo.files, VAE: repo.files[VAE] + b"v2"}, commit="e" * 40)
    hub.repos[REPO] = newer
    res = run("t2v-14b", "-c", "vae", "--dir", str(dest), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["commit"] == newer.commit and (dest / VAE).read_bytes() == newer.files[VAE]


def test_settings_follow_the_environment(tmp_path: Path, monkeypatch):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "token").write_text("hf_saved\n")  # what `hf auth login` leaves behind
    s = dl.HubSettings.from_env()
    assert (s.cache_dir, s.token, s.endpoint, s.offline) == (tmp_path / "hub", "hf_saved", "http://127.0.0.1:9", True)
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    s = dl.HubSettings.from_env()
    assert (s.cache_dir, s.token, s.offline) == (tmp_path / "elsewhere", "hf_env", False)


def test_convert_takes_a_downloaded_catalog_name(hub: FakeHub, tmp_path: Path):
    assert run("t2v-14b", "-c", "dit").exit_code == 0
    pack = tmp_path / "pack"
    arch = find_entry("t2v-14b").arch  # tiny widths: config.json alone cannot name the architecture
    res = CliRunner().invoke(app, ["convert", "t2v-14b", "--arch", arch, "-c", "dit", "--out", str(pack), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["components"] == ["dit"] and (pack / "manifest.json").is_file()


# --------------------------------------------------------------------------------------------- hostile Hub metadata

EVIL = "evil/repo"
ESCAPE = "../../../../VICTIM"  # from HF_HOME/hub/models--evil--repo/blobs: climbs to tmp_path


def _outside(tmp_path: Path) -> dict[str, bytes]:
    """Every file under tmp_path that is not in the HF cache (what a download may never create or change)."""
    return {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in tmp_path.rglob("*")
            if p.is_file() and not p.is_symlink() and "hf" not in p.relative_to(tmp_path).parts}  # fmt: skip


HOSTILE = [
    ("lfs sha256 climbs out", {"meta": {"w.safetensors": {"lfs": {"sha256": ESCAPE}}}}, "invalid LFS sha256"),
    ("lfs sha256 upper case", {"meta": {"w.safetensors": {"lfs": {"sha256": "A" * 64}}}}, "invalid LFS sha256"),
    ("lfs sha256 not a string", {"meta": {"w.safetensors": {"lfs": {"sha256": 12}}}}, "invalid LFS sha256"),
    ("blob id climbs out", {"meta": {"config.json": {"blobId": "../../../../VICTIM"}}}, "invalid git blob id"),
    ("blob id too long", {"meta": {"config.json": {"blobId": "b" * 41}}}, "invalid git blob id"),
    ("commit climbs out", {"info_sha": "../../../../VICTIM"}, "invalid commit hash"),
    ("negative size", {"meta": {"w.safetensors": {"lfs": {"size": -5}}}}, "invalid size"),
    ("file name climbs out", {"meta": {"config.json": {"rfilename": "../../../../VICTIM"}}}, "unsafe file name"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "hostile", "message"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_metadata_never_becomes_a_path(hub: FakeHub, tmp_path: Path, label, hostile, message):
    files = {"config.json": b"{}", "w.safetensors": b"weights" * 100}
    hub.repos[EVIL] = FakeRepo(files, commit="1" * 40, **hostile)
    (tmp_path / "VICTIM").write_bytes(b"precious")
    before = _outside(tmp_path)
    res = run(EVIL)
    assert res.exit_code == 1 and message in res.stderr, res.output
    assert res.stderr.count("error:") == 1 and "Traceback" not in res.output
    assert _outside(tmp_path) == before  # nothing outside the cache was written, replaced or deleted
    assert [e for e in hub.log if "/resolve/" in e[1]] == []  # refused before any file was requested


def test_hostile_etag_headers_are_never_used(hub: FakeHub, tmp_path: Path):
    """huggingface_hub's hf_hub_download names cache blobs after the ETag header, unchecked; wanpack never asks it."""
    files = {"config.json": b"{}", "w.safetensors": b"weights" * 100}
    hub.repos[EVIL] = FakeRepo(files, commit="1" * 40)
    hub.etags.update({"config.json": ESCAPE, "w.safetensors": ESCAPE})
    (tmp_path / "VICTIM").write_bytes(b"precious")
    before = _outside(tmp_path)
    res = run(EVIL, "--json")
    assert res.exit_code == 0, res.output
    folder = Path(json.loads(res.stdout)["folder"])
    assert {n: (folder / n).read_bytes() for n in files} == files
    assert _outside(tmp_path) == before


def test_cache_symlink_to_outside_is_never_deleted(hub: FakeHub, tmp_path: Path, monkeypatch):
    files = {"config.json": b"{}", "w.safetensors": b"weights" * 100}
    hub.repos[EVIL] = FakeRepo(files, commit="1" * 40)
    assert run(EVIL).exit_code == 0
    victim = tmp_path / ("f" * 64)  # named like a blob, so the offline check hashes it and finds a mismatch
    victim.write_bytes(b"precious")
    link = tmp_path / "hf" / "hub" / "models--evil--repo" / "snapshots" / ("1" * 40) / "w.safetensors"
    link.unlink()
    link.symlink_to(victim)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = run(EVIL)
    assert res.exit_code == 1 and "outside" in res.stderr and "Traceback" not in res.output
    assert victim.read_bytes() == b"precious" and link.is_symlink()


def test_revision_that_climbs_out_is_refused(hub: FakeHub):
    res = run("t2v-14b", "--revision", "../../../x")
    assert res.exit_code == 2 and "not a valid branch, tag or commit" in res.stderr
