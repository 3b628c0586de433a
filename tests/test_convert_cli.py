"""The convert/inspect/verify/synth commands through Typer's CliRunner: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wanpack.cli import app
from wanpack.convert.synth import DIT_SINGLE, synth_checkpoint

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments: str) -> None:
    text = result.output
    assert result.exit_code != 0
    assert "Traceback" not in text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), text
    for f in fragments:
        assert f in " ".join(lines), (f, text)


@pytest.fixture()
def src(tmp_path) -> Path:
    out = tmp_path / "src"
    synth_checkpoint(out, "wan2.1-t2v-14b", layers=2, dim_scale="tiny", components=("dit", "t5", "vae"))
    return out


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for cmd in ("convert", "synth", "inspect", "verify"):
        assert cmd in result.output


def test_convert_inspect_verify_happy_path(src, tmp_path):
    pack = tmp_path / "pack"
    result = run("convert", src, "--quant", "int8", "--save-by-block", "--out", pack, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["quant"] == "int8" and summary["layout"] == "by_block" and summary["pack_bytes"] > 0
    result = run("inspect", pack, "--blocks")
    assert result.exit_code == 0 and "block_1.safetensors" in result.output and "self_attn" in result.output
    result = run("inspect", pack, "--json")
    assert json.loads(result.stdout)["components"]["dit"]["quant"]["scheme"] == "int8"
    result = run("verify", pack)
    assert result.exit_code == 0 and "match the manifest" in result.output


def test_verify_names_each_bad_file(src, tmp_path):
    pack = tmp_path / "pack"
    assert run("convert", src, "--save-by-block", "--out", pack).exit_code == 0
    with open(pack / "dit" / "block_1.safetensors", "r+b") as f:
        f.seek(-5000, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    (pack / "dit" / "non_block.safetensors").unlink()
    result = run("verify", pack)
    assert result.exit_code == 1
    assert "dit/block_1.safetensors" in result.output and "sha256" in result.output
    assert "dit/non_block.safetensors: missing" in result.output
    assert "block_0" not in result.output


def _converted_all(src: Path, tmp_path: Path) -> Path:
    pack = tmp_path / "pack"
    assert run("convert", src, "-c", "all", "--save-by-block", "--out", pack).exit_code == 0
    return pack


def test_verify_hashes_tokenizer_files_and_checks_header_shapes(src, tmp_path):
    pack = _converted_all(src, tmp_path)
    result = run("verify", pack, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["no_recorded_hash"] == [] and report["bad"] == {}
    assert report["checked"] == sum(1 for p in pack.rglob("*") if p.is_file()) - 1  # every file but the manifest
    tok = pack / "t5" / "tokenizer" / "tokenizer_config.json"
    tok.write_bytes(tok.read_bytes().replace(b"}", b',"x":1}'))  # edited: used to pass verify and break run
    result = run("verify", pack)
    assert result.exit_code == 1 and "t5/tokenizer/tokenizer_config.json" in result.output
    # A shard whose header says another shape, with the manifest's sha256 updated to match: only shapes differ.
    manifest = json.loads((pack / "manifest.json").read_text())
    shard = manifest["components"]["dit"]["shards"][0]
    entry = next(t for t in shard["tensors"] if len(t["shape"]) == 2 and t["shape"][0] != t["shape"][1])
    path = pack / shard["path"]
    old = json.dumps(entry["shape"], separators=(",", ":")).encode()
    new = json.dumps(entry["shape"][::-1], separators=(",", ":")).encode()
    data = path.read_bytes()
    assert data.count(old) >= 1 and len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))
    import hashlib

    shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (pack / "manifest.json").write_text(json.dumps(manifest))
    result = run("verify", pack)
    assert result.exit_code == 1 and "shape" in result.output and shard["path"] in result.output


def test_verify_notes_files_a_format_1_pack_has_no_hash_for(src, tmp_path):
    pack = _converted_all(src, tmp_path)
    manifest = json.loads((pack / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["components"]["t5"]["files"] = [f["path"] for f in manifest["components"]["t5"]["files"]]
    (pack / "manifest.json").write_text(json.dumps(manifest))
    result = run("verify", pack)
    assert result.exit_code == 0, result.output
    assert "t5/tokenizer/tokenizer.json: the manifest records no hash" in " ".join(result.output.split())


def test_verify_refuses_a_fifo_and_a_symlink_out_of_the_pack(src, tmp_path):
    pack = _converted_all(src, tmp_path)
    (pack / "dit" / "block_0.safetensors").unlink()
    os.mkfifo(pack / "dit" / "block_0.safetensors")
    (pack / "vae" / "non_block.safetensors").unlink()
    (pack / "vae" / "non_block.safetensors").symlink_to("/dev/zero")
    result = run("verify", pack)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "not a regular file" in text and "outside the pack" in text


def test_existing_output_needs_force_and_force_replaces(src, tmp_path):
    pack = tmp_path / "pack"
    assert run("convert", src, "--out", pack).exit_code == 0
    first = json.loads((pack / "manifest.json").read_text())
    one_line_error(run("convert", src, "--out", pack, "--quant", "fp8"), "already exists", "--force")
    assert json.loads((pack / "manifest.json").read_text()) == first  # untouched
    assert run("convert", src, "--out", pack, "--quant", "fp8", "--force").exit_code == 0
    assert json.loads((pack / "manifest.json").read_text())["components"]["dit"]["quant"]["scheme"] == "fp8"
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("precious")
    one_line_error(run("convert", src, "--out", user_dir, "--force"), "not a wanpack pack")
    assert (user_dir / "notes.txt").read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if ".wanpack-tmp-" in p.name]


def test_unknown_quant_and_component(src, tmp_path):
    one_line_error(run("convert", src, "--quant", "int4", "--out", tmp_path / "p"), "int4")
    one_line_error(run("convert", src, "-c", "unet", "--out", tmp_path / "p"), "unet")
    assert not (tmp_path / "p").exists()


def _rewrite_dit(src: Path, edit) -> None:
    from safetensors import safe_open

    from wanpack.convert.safetensors_io import write_safetensors

    with safe_open(str(src / DIT_SINGLE), "pt") as g:
        tensors = {k: g.get_tensor(k) for k in g.keys()}
    edit(tensors)
    write_safetensors(src / DIT_SINGLE, tensors)


def test_missing_unexpected_and_misshaped_keys_are_named(src, tmp_path):
    _rewrite_dit(src, lambda t: t.pop("blocks.1.cross_attn.k.weight"))
    one_line_error(run("convert", src, "--out", tmp_path / "p"), "missing tensor blocks.1.cross_attn.k.weight")
    _rewrite_dit(src, lambda t: t.update({"blocks.1.cross_attn.k.weight": torch.zeros(64, 64),
                                          "blocks.0.extra.weight": torch.zeros(2)}))  # fmt: skip
    one_line_error(run("convert", src, "--out", tmp_path / "p"), "unexpected tensor blocks.0.extra.weight")
    _rewrite_dit(src, lambda t: (t.pop("blocks.0.extra.weight"), t.update({"head.head.weight": torch.zeros(3, 64)})))
    one_line_error(run("convert", src, "--out", tmp_path / "p"), "head.head.weight", "[3, 64]")
    assert not (tmp_path / "p").exists()


def test_truncated_and_corrupt_safetensors(src, tmp_path):
    path = src / DIT_SINGLE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    one_line_error(run("convert", src, "--out", tmp_path / "p"), "truncated")
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    one_line_error(run("convert", src, "--out", tmp_path / "p"), "not valid JSON")
    path.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    one_line_error(run("convert", src, "--out", tmp_path / "p"), "impossible")
    path.write_bytes(b"abc")
    one_line_error(run("convert", src, "--out", tmp_path / "p"), "too short")
    assert not (tmp_path / "p").exists()


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pth_needing_arbitrary_unpickling_is_refused(src, tmp_path):
    torch.save({"blocks.0.norm1.weight": torch.ones(2), "evil": Evil()}, src / "models_t5_umt5-xxl-enc-bf16.pth")
    result = run("convert", src, "-c", "t5", "--out", tmp_path / "p")
    one_line_error(result, "unpickling", "refusing")
    assert "pwned" not in result.output


def test_no_space_is_checked_before_writing(src, tmp_path, monkeypatch):
    import shutil as sh

    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1000))
    one_line_error(run("convert", src, "--out", tmp_path / "p"), "needs", "free")
    assert not (tmp_path / "p").exists()


def test_disk_full_mid_write_leaves_nothing(src, tmp_path, monkeypatch):
    import errno

    calls = {"n": 0}
    real = os.pwrite

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    one_line_error(run("convert", src, "--out", tmp_path / "p"), "disk full")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["src"]  # locks stay (atomic.py)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_conversion_leaves_no_pack_and_rerun_succeeds(tmp_path, sig):
    src = tmp_path / "src"
    # full-width 1.3B blocks: large enough (~800 MB) that the conversion is still running when we interrupt it, even
    # when this test process is descheduled for a moment after seeing the first block file (2 layers were not)
    synth_checkpoint(src, "wan2.1-t2v-1.3b", layers=4)
    pack = tmp_path / "pack"
    cmd = [sys.executable, "-m", "wanpack", "convert", str(src), "--save-by-block", "--out", str(pack)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline:
        tmps = [p for p in tmp_path.iterdir() if ".wanpack-tmp-" in p.name]
        if tmps and any((tmps[0] / "dit").glob("block_*.safetensors")):
            break
        time.sleep(0.005)
    else:
        pytest.fail("conversion never started writing")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not pack.exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and b"Traceback" not in stderr
        assert not [p for p in tmp_path.iterdir() if ".wanpack-tmp-" in p.name]
    rerun = subprocess.run(cmd, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert (pack / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".wanpack-tmp-" in p.name]  # stale temp folder cleaned
    assert subprocess.run([sys.executable, "-m", "wanpack", "verify", str(pack)], capture_output=True).returncode == 0
    shutil.rmtree(src)


def test_synth_command(tmp_path):
    result = run("synth", "--arch", "wan2.1-i2v-14b", "--dim-scale", "tiny", "--layers", "1", "-c", "all",
                 "--shards", "2", "--out", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "s").iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors.index.json", "Wan2.1_VAE.pth",
            "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", "models_t5_umt5-xxl-enc-bf16.pth"} <= names  # fmt: skip
    one_line_error(run("synth", "--arch", "wan3", "--out", tmp_path / "x"), "unknown architecture")


def test_synth_refuses_bad_flags_and_leaves_nothing(tmp_path):
    tiny = ["synth", "--dim-scale", "tiny", "--layers", "1"]
    for args, fragment in ((["--dtype", "fp16"], "fp16"), (["--quant", "fp8"], "--as-pack"), (["--shards", "0"], "--shards"),
                           (["--as-pack", "--quant", "int4"], "int4")):  # fmt: skip
        result = run(*tiny, *args, "--out", tmp_path / "s")
        assert result.exit_code == 2, (args, result.output)
        one_line_error(result, fragment)
        assert list(tmp_path.iterdir()) == [], args  # no folder, no hidden temp folder


def test_synth_is_atomic_and_replaces_only_with_force(tmp_path):
    out = tmp_path / "s"
    tiny = ["synth", "--dim-scale", "tiny", "--layers", "1", "--out", out]
    assert run(*tiny).exit_code == 0
    first = (out / DIT_SINGLE).read_bytes()
    one_line_error(run(*tiny, "--seed", "1"), "already exists", "--force")
    assert (out / DIT_SINGLE).read_bytes() == first
    result = run(*tiny, "--seed", "1", "--force")
    assert result.exit_code == 0, result.output
    assert (out / DIT_SINGLE).read_bytes() != first
    assert "synth: " in result.output  # progress (plain lines when not on a terminal)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    one_line_error(run("synth", "--dim-scale", "tiny", "--layers", "1", "--out", mine, "--force"), "not a synthetic")
    assert (mine / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in _left(tmp_path)) == ["mine", "s"]


def test_interrupted_synth_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C after the DiT is written (while the T5 is): exit 130, no folder, no hidden temp folder; a temp folder a
    killed run left behind is removed by the next one."""
    import wanpack.convert.synth as synth_mod

    def interrupted(*args, **kwargs):
        assert any(tmp_path.glob(".s.wanpack-tmp-*/*.safetensors"))  # the DiT really is half-way on disk
        raise KeyboardInterrupt

    stale = tmp_path / ".s.wanpack-tmp-999999999"  # no such process: what SIGKILL leaves behind
    stale.mkdir()
    with monkeypatch.context() as m:
        m.setattr(synth_mod, "synth_pth", interrupted)
        result = run("synth", "--dim-scale", "tiny", "--layers", "1", "-c", "all", "--out", tmp_path / "s")
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert _left(tmp_path) == []
    assert run("synth", "--dim-scale", "tiny", "--layers", "1", "-c", "all", "--out", tmp_path / "s").exit_code == 0
    assert [p.name for p in _left(tmp_path)] == ["s"]


def _left(folder: Path) -> list[Path]:
    """What a command left in ``folder``, except the lock files that stay beside an output by design (pack_lock.py)."""
    return [p for p in folder.iterdir() if not p.name.endswith(".wanpack-convert.lock")]


def test_random_weight_packs_are_marked(tmp_path):
    assert run("synth", "--dim-scale", "tiny", "--layers", "1", "--as-pack", "--out", tmp_path / "p").exit_code == 0
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["source"]["synthetic"] is True
    assert run("synth", "--dim-scale", "tiny", "--layers", "1", "--out", tmp_path / "src").exit_code == 0
    assert run("convert", tmp_path / "src", "--out", tmp_path / "c").exit_code == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["source"]["synthetic"] is True
    assert "RANDOM weights" in run("inspect", tmp_path / "c").output


def test_missing_paths_are_usage_errors_and_error_lines_keep_brackets(tmp_path):
    result = run("convert", tmp_path / "nope", "--out", tmp_path / "p")
    assert result.exit_code == 2
    one_line_error(result, "neither a folder")
    for cmd in ("inspect", "verify", "plan"):
        budgets = ["--vram-budget", "8GiB", "--ram-budget", "8GiB"] if cmd == "plan" else []
        result = run(cmd, tmp_path / "no[/x]such[red]pack", *budgets)
        assert result.exit_code == 2, (cmd, result.output)
        one_line_error(result, "no[/x]such[red]pack: no such folder")  # markup in a path is text, not a tag


def test_error_and_warning_lines_are_whole_when_piped(tmp_path):
    """Piped stderr is not a terminal: rich would wrap at 80 columns unless told not to."""
    env = {**os.environ, "COLUMNS": "80", "WANPACK_CACHE": str(tmp_path / "cache")}
    long = tmp_path / ("a-folder-name-long-enough-to-pass-eighty-columns-" * 3) / "pack"
    proc = subprocess.run([sys.executable, "-m", "wanpack", "inspect", str(long)], capture_output=True, text=True,
                          env=env)  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(long) in lines[0]
    missing = tmp_path / "missing" / "v.mp4"  # the demo's warning comes first, then the refusal of --out
    proc = subprocess.run([sys.executable, "-m", "wanpack", "run", "--out", str(missing)], capture_output=True,
                          text=True, env=env)  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and str(missing.parent) in lines[-1], proc.stderr
    warning = next(ln for ln in lines if ln.startswith("no --pack given"))
    assert len(warning) > 80 and warning.endswith("not your prompt"), proc.stderr


def test_convert_arch_must_match_the_source(src, tmp_path):
    # src declares wan2.1-t2v-14b: another name is refused before anything is written
    for arch, fragment in (("wan2.1-i2v-14b", "declares wan2.1-t2v-14b"), ("wan2.2-t2v", "unknown architecture")):
        result = run("convert", src, "--arch", arch, "--out", tmp_path / "p")
        assert result.exit_code == 2, result.output
        one_line_error(result, fragment)
        assert not (tmp_path / "p").exists()
    hub = tmp_path / "hub"  # the same files without the synth declaration: only config.json and the shapes speak
    shutil.copytree(src, hub, ignore=shutil.ignore_patterns("wanpack_synth.json"))
    one_line_error(run("convert", hub, "--arch", "wan2.1-i2v-14b", "--out", tmp_path / "p"), "model_type 't2v'")
    assert run("convert", src, "--arch", "wan2.1-t2v-14b", "--out", tmp_path / "ok").exit_code == 0
