"""Many videos per load (`wanpack run --prompts`), the session's reuse, the overlapped writer and the rescued latent (CPU).

The embedded demo pack (tiny, random weights, the real pack format) keeps these quick; every run goes through the
CLI as documented, so the paths a user runs are the ones tested.
"""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wanpack.cli import app
from wanpack.runtime import session as session_mod
from wanpack.runtime.pack import PackComponent
from wanpack.runtime.video import VideoWriter, read_video_info

runner = CliRunner()
SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu"]  # CPU also on a GPU box


@pytest.fixture(scope="module")
def pack(demo_pack_dir) -> Path:
    return demo_pack_dir


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_jobs(path: Path, *lines) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


class CountingEngine(session_mod.StreamEngine):
    built: list[str] = []

    def __init__(self, pack, *args, **kwargs):
        CountingEngine.built.append(pack.name)
        super().__init__(pack, *args, **kwargs)


def test_two_jobs_from_one_load(pack, tmp_path, monkeypatch):
    """One session: the DiT engine is built once for both jobs; the negative prompt is encoded once."""
    CountingEngine.built = []
    monkeypatch.setattr(session_mod, "StreamEngine", CountingEngine)
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a fox", "seed": 1}, "",
                      {"prompt": "a cat", "seed": 2, "out": "cat.mp4"})  # fmt: skip
    res = run("run", "--pack", pack, "--prompts", jobs, "--out-dir", tmp_path / "videos", "--json", *SMALL)
    assert res.exit_code == 0, res.output
    records = json.loads(res.stdout)
    assert [Path(r["video"]).name for r in records] == ["jobs-001.mp4", "cat.mp4"]
    for r in records:
        assert read_video_info(r["video"])[:3] == (5, 32, 32)
        assert Path(r["video"]).with_suffix(".json").is_file()
    assert CountingEngine.built.count("dit") == 1  # planned and loaded once, used by both jobs
    assert CountingEngine.built.count("t5") == 1  # kept between jobs (its blocks stay mapped for the next prompt)
    assert records[0]["details"]["prompts_encoded"] == 2  # the prompt and the negative prompt
    assert records[1]["details"]["prompts_encoded"] == 1  # the negative prompt's embedding was kept
    assert records[1]["timings_s"]["setup"] < records[0]["timings_s"]["setup"] + 1.0
    assert [r["seed"] for r in records] == [1, 2]


@pytest.mark.parametrize(
    ("lines", "fragments"),
    [
        (['{"prompt": "a fox"}', "{not json"], ["line 2", "not valid JSON"]),
        (['{"prompt": "a fox"}', '{"prompt": "x"}', '{"prompt": "y", "stepz": 3}'], ["line 3", "stepz", "steps"]),
        (['{"seed": 3}'], ["line 1", '"prompt" must be a non-empty string']),
        (['{"prompt": "x", "out": "../escape.mp4"}'], ["line 1", "inside --out-dir"]),
        (['{"prompt": "x", "out": "v.mkv"}'], ["line 1", ".mp4"]),
        (['{"prompt": "x", "out": "a.mp4"}', '{"prompt": "y", "out": "a.mp4"}'], ["line 2", "a.mp4", "line 1"]),
        (['{"prompt": "x", "frames": 6}'], ["line 1", "4n+1"]),
        (['{"prompt": "x", "image": "cat.png"}'], ["line 1", "--image"]),
        (["", "  "], ["has no jobs"]),
    ],
    ids=["json", "unknown-key", "no-prompt", "traversal", "container", "duplicate-out", "frames", "image-for-t2v",
         "empty"],
)  # fmt: skip
def test_every_line_is_checked_before_any_heavy_work(pack, tmp_path, monkeypatch, lines, fragments):
    def never(*a, **k):
        raise AssertionError("a session started although a line is bad")

    monkeypatch.setattr(session_mod.Session, "__init__", never)
    (tmp_path / "cat.png").write_bytes(b"not used")
    jobs = write_jobs(tmp_path / "jobs.jsonl", *lines)
    started = time.perf_counter()
    res = run("run", "--pack", pack, "--prompts", jobs, "--out-dir", tmp_path / "out", *SMALL)
    assert res.exit_code == 2, res.output
    last = [ln for ln in res.output.splitlines() if ln.strip()][-1]
    assert last.startswith("error:") and "Traceback" not in res.output
    for f in fragments:
        assert f in res.output, (f, res.output)
    assert time.perf_counter() - started < 5.0
    assert not list((tmp_path / "out").glob("*.mp4"))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--prompt", "x"], "drop --prompt"), ([], "needs --out-dir"), (["--out-dir", "o"], None)],
    ids=["with-prompt", "no-out-dir", "out-dir-alone"],
)  # fmt: skip
def test_prompts_flag_combinations(pack, tmp_path, args, fragment):
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a"})
    argv = ["run", "--pack", pack, *args] + (["--prompts", jobs] if fragment else ["--prompt", "x"])
    if fragment == "drop --prompt":
        argv += ["--out-dir", tmp_path / "o"]
    res = run(*argv)
    assert res.exit_code == 2
    assert (fragment or "--out-dir goes with --prompts") in res.output


def test_a_failed_write_keeps_the_latent_and_says_where(pack, tmp_path, monkeypatch):
    import os

    from wanpack.runtime import video

    real_replace = os.replace

    def full_disk(src, dst, *args, **kwargs):  # the mp4's final rename fails as on a full disk; other writes work
        if str(dst).endswith(".mp4"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(video.os, "replace", full_disk)
    out = tmp_path / "v.mp4"
    res = run("run", "--pack", pack, "--prompt", "a fox", "--out", out, "--seed", 3, *SMALL)
    assert res.exit_code == 1
    line = [ln for ln in res.output.splitlines() if ln.strip()][-1]
    assert "No space left on device" in line and "final latent is saved in" in line
    rescue = out.with_suffix(".latents.safetensors")
    assert rescue.is_file() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the partial video was removed
    from safetensors.torch import load_file

    assert load_file(rescue)["latents"].shape[1] == 16


def test_latent_kept_only_when_asked(pack, tmp_path):
    res = run("run", "--pack", pack, "--prompt", "a fox", "--out", tmp_path / "a.mp4", *SMALL)
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "a.latents.safetensors").exists()
    res = run("run", "--pack", pack, "--prompt", "a fox", "--out", tmp_path / "b.mp4", "--save-latents", *SMALL)
    assert (tmp_path / "b.latents.safetensors").is_file()
    side = json.loads((tmp_path / "b.json").read_text())
    assert side["latents"].endswith("b.latents.safetensors")


def test_sidecar_records_the_plan_backends_io_and_writer(pack, tmp_path):
    out = tmp_path / "v.mp4"
    res = run("run", "--pack", pack, "--prompt", "a fox", "--out", out, "--granularity", "block", "--lazy-load", *SMALL)
    assert res.exit_code == 0, res.output
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["plan"]["explicit"] == {"offload_granularity": "block", "cpu_offload": True, "lazy_load": True}
    assert side["plan"]["device"] == "cpu" and side["plan"]["read_mode"] == "cached"
    assert side["backends"]["attention"] == "sdpa"
    assert side["io"]["pack_bytes_read"] > 0
    assert side["encoder"]["codec"] == "libx264" and side["encoder"]["preset"] in ("veryfast", "ultrafast")
    assert {"setup", "text", "denoise", "save_latent", "decode", "write", "total"} <= set(side["timings_s"])
    assert set(side["stage_cpu_s"]) == set(side["timings_s"]) - {"total"}
    assert all(v["process"] >= 0 and v["thread"] >= 0 for v in side["stage_cpu_s"].values())
    assert side["size"] == {"height": 32, "width": 32, "frames": 5}
    assert len(side["details"]["steps_s"]) == 2
    # plain progress lines, one per phase and step, with an ETA
    assert "denoise" in res.output and "step 2/2" in res.output and "ETA" in res.output and "decoded 5/5" in res.output


def test_video_writer_encodes_in_the_background_and_publishes_atomically(tmp_path):
    out = tmp_path / "w.mp4"
    writer = VideoWriter(out, 64, 48, fps=8)
    for i in range(3):
        writer.put(torch.full((3, 48, 64, 3), 40 * i, dtype=torch.uint8))
    assert not out.exists()  # only the temporary file exists until close()
    writer.close()
    assert read_video_info(out) == (9, 48, 64, 8.0)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    aborted = VideoWriter(tmp_path / "x.mp4", 64, 48)
    aborted.put(torch.zeros((1, 48, 64, 3), dtype=torch.uint8))
    aborted.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.mp4"]
    with pytest.raises(Exception, match="frames must be"):
        VideoWriter(tmp_path / "y.mp4", 64, 48).put(torch.zeros((1, 48, 64, 3), dtype=torch.float32))


def test_read_rows_equals_the_full_table(pack):
    comp = PackComponent(pack, "t5")
    table = comp.load_resident()["token_embedding.weight"]
    rows = [5, 0, 5, table.shape[0] - 1]
    assert torch.equal(comp.read_rows("token_embedding.weight", rows), table[rows])
    assert "token_embedding.weight" not in comp.load_resident(skip=("token_embedding.weight",))


def test_a_tokenizer_linked_outside_the_pack_is_refused_even_when_unlisted(pack, tmp_path):
    import shutil

    copy = tmp_path / "pack"
    shutil.copytree(pack, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"]["t5"]["files"] = []  # a hostile manifest that does not list the tokenizer
    (copy / "manifest.json").write_text(json.dumps(manifest))
    tok = copy / "t5" / "tokenizer" / "tokenizer.json"
    outside = tmp_path / "elsewhere.json"
    shutil.copy(tok, outside)
    tok.unlink()
    tok.symlink_to(outside)
    res = run("run", "--pack", copy, "--prompt", "a fox", "--out", tmp_path / "v.mp4", *SMALL)
    assert res.exit_code == 1 and "outside the pack" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "v.mp4").exists()


def test_kept_engines_lend_their_slots_to_the_decode_and_the_next_job_is_unchanged(pack, tmp_path):
    """Between jobs the kept engines give their device slots to the VAE and take them back at their next forward;
    the same job twice in one session yields the same latent, bit for bit."""
    from safetensors.torch import load_file

    job = {"prompt": "a fox", "seed": 4}
    jobs = write_jobs(tmp_path / "jobs.jsonl", {**job, "out": "a.mp4"}, {**job, "out": "b.mp4"})
    res = run("run", "--pack", pack, "--prompts", jobs, "--out-dir", tmp_path / "v", "--json", "--save-latents", *SMALL)
    assert res.exit_code == 0, res.output
    records = json.loads(res.stdout)
    assert all(r["details"]["slots_lent_to_vae_bytes"] > 0 for r in records)
    a, b = (load_file(r["latents"])["latents"] for r in records)
    assert torch.equal(a, b)


def test_a_job_that_fails_while_the_dit_builds_does_not_cost_the_next_job_a_rebuild(pack, tmp_path, monkeypatch):
    """The DiT engine builds beside the text phase; when that job fails there, the next job of the same plan takes the
    engine already built (or still building) instead of building another."""
    CountingEngine.built = []
    monkeypatch.setattr(session_mod, "StreamEngine", CountingEngine)
    real = session_mod.Session._encode_text
    calls = []

    def flaky(self, job, *args, **kwargs):
        calls.append(job.prompt)
        if len(calls) == 1:
            raise session_mod.WanpackError("the text encoder failed (test)")
        return real(self, job, *args, **kwargs)

    monkeypatch.setattr(session_mod.Session, "_encode_text", flaky)
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a fox", "seed": 1}, {"prompt": "a cat", "seed": 2})
    res = run("run", "--pack", pack, "--prompts", jobs, "--out-dir", tmp_path / "v", "--json", *SMALL)
    assert res.exit_code == 1 and "1 of 2 jobs failed" in res.output and "the text encoder failed (test)" in res.output
    assert CountingEngine.built.count("dit") == 1
    assert [p.name for p in (tmp_path / "v").glob("*.mp4")] == ["jobs-002.mp4"]
